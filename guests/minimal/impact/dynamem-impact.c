/*
 * dynamem-impact: a stand-in application that shows how much a resize disturbs it.
 *
 * usage: dynamem-impact <working-set-bytes> <log-file>
 *
 * It allocates the working set, touches every page once (then prints "ready" to stdout),
 * and keeps writing one byte per page, round and round. Every 10 ms of its own
 * CLOCK_MONOTONIC it appends "<ns> <pages touched so far>" to the log, so the host can
 * compute throughput per interval and the longest stall (a gap between log lines).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s <working-set-bytes> <log-file>\n", argv[0]);
		return 2;
	}
	size_t size = strtoull(argv[1], NULL, 10);
	long page = sysconf(_SC_PAGESIZE);
	size_t pages = size / (size_t)page;
	FILE *log = fopen(argv[2], "w");
	char *mem = malloc(size);
	if (!log || !mem || pages == 0) {
		perror("dynamem-impact");
		return 1;
	}
	setvbuf(log, NULL, _IOFBF, 1 << 16);
	for (size_t i = 0; i < pages; i++)
		mem[i * (size_t)page] = 1;
	printf("ready\n");
	fflush(stdout);
	unsigned long long touched = 0;
	long long next = now_ns() + 10000000LL;
	for (size_t i = 0;; i = (i + 1) % pages) {
		mem[i * (size_t)page]++;
		touched++;
		if ((touched & 63) == 0) {
			long long t = now_ns();
			if (t >= next) {
				fprintf(log, "%lld %llu\n", t, touched);
				fflush(log);
				next = t + 10000000LL;
			}
		}
	}
}
