/*
 * dynamem-sampler: the guest half of dynamem's measurement channel.
 *
 * Why a static C program: under TCG a shell loop that forks `cat` 200 times a second
 * perturbs the very guest it measures. This reads /proc with open/read only, sends one
 * short line per sample over a virtio-serial port, and the host timestamps each line on
 * arrival. The host steers it with one-line commands on the same port:
 *
 *   interval <ns>             sample every <ns> nanoseconds (0 stops sampling)
 *   meminfo <key>...          /proc/meminfo fields carried in each sample (kB)
 *   vmstat <key>...           /proc/vmstat fields carried in each sample
 *   fmeminfo <key>...         /proc/meminfo fields of the full record (kB)
 *   fvmstat <key>...          /proc/vmstat fields of the full record
 *   every <n>                 send a full record with every n-th sample (0: never)
 *   batch <n>                 hold samples until n are pending (1: send each at once);
 *                             each write to the port costs a virtqueue kick, which under
 *                             TCG dominates the sampler's cost at low rates
 *   ping <token>              answered at once with "pong <token> <guest_ns>"
 *   snap <token> <path>...    whole files, framed as "f <token> <path> <bytes>\n<bytes>\n";
 *                             the path "memblocks" lists memory blocks, state, valid zones;
 *                             "kmsg" is the kernel log as /dev/kmsg records (no dmesg
 *                             process, so nothing new is allocated while a resize is measured)
 *   cpu <token>               "cpu <token> <ns>": CPU time this sampler has used, from
 *                             /proc/self/schedstat (exact, unlike tick-sampled utime)
 *
 * It sends "hello 1" at start; each sample is
 *   s <seq> <guest_monotonic_ns> <totalram_kB> <freeram_kB> <freeswap_kB> <meminfo...> <vmstat...>
 * and every n-th sample is followed by
 *   S <seq> <guest_monotonic_ns> <fmeminfo...> <fvmstat...>
 * Fast samples time a resize; full records (at a lower rate) show what it cost.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#define MAX_KEYS 48
#define KEY_LEN 48
#define BUF_SIZE (256 * 1024)

struct keyset {
	const char *path;
	int fd;
	int n;
	char keys[MAX_KEYS][KEY_LEN];
	unsigned long long values[MAX_KEYS];
	int line_of[MAX_KEYS]; /* cached line index of each key: /proc files keep their order */
};

static int port = -1;
static long long interval_ns;
static unsigned long long seq;
static struct keyset meminfo = { .path = "/proc/meminfo", .fd = -1 };
static struct keyset vmstat = { .path = "/proc/vmstat", .fd = -1 };
static struct keyset fmeminfo = { .path = "/proc/meminfo", .fd = -1 };
static struct keyset fvmstat = { .path = "/proc/vmstat", .fd = -1 };
static long every;
static long batch = 1;
static char outbuf[64 * 1024];
static size_t outlen;
static long pending;
static char filebuf[BUF_SIZE];

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void write_all(const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(port, buf, len);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return; /* host gone: drop, keep running */
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void flush(void)
{
	if (outlen)
		write_all(outbuf, outlen);
	outlen = 0;
	pending = 0;
}

/* Replies keep their place in the stream: anything batched goes out first. */
static void send_all(const char *buf, size_t len)
{
	flush();
	write_all(buf, len);
}

static void queue_sample(const char *buf, size_t len)
{
	if (outlen + len > sizeof outbuf)
		flush();
	memcpy(outbuf + outlen, buf, len);
	outlen += len;
	if (++pending >= batch)
		flush();
}

static ssize_t read_file(int fd, const char *path, char *buf, size_t size)
{
	ssize_t total = 0, n;
	int own = fd < 0;
	if (own)
		fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	if (!own && lseek(fd, 0, SEEK_SET) < 0)
		return -1;
	while ((size_t)total < size - 1 && (n = read(fd, buf + total, size - 1 - total)) > 0)
		total += n;
	if (own)
		close(fd);
	buf[total] = 0;
	return total;
}

static int key_matches(const char *line, const char *key)
{
	size_t klen = strlen(key);
	return strncmp(line, key, klen) == 0 && (line[klen] == ':' || line[klen] == ' ');
}

static unsigned long long value_after_key(const char *line, const char *key)
{
	const char *p = line + strlen(key);
	p += strspn(p, ": ");
	return strtoull(p, NULL, 10);
}

/*
 * Fill ks->values from "key[:] value" lines, in the order the host asked for. Under TCG
 * every instruction is emulated, so the line index of each key is cached and only those
 * lines are compared; a miss (a kernel that reordered) falls back to a full scan.
 */
static void read_keys(struct keyset *ks)
{
	char *lines[1024];
	int nlines = 0;
	if (ks->n == 0)
		return;
	if (ks->fd < 0)
		ks->fd = open(ks->path, O_RDONLY | O_CLOEXEC);
	if (read_file(ks->fd, ks->path, filebuf, sizeof filebuf) < 0)
		return;
	for (char *p = filebuf; *p && nlines < 1024;) {
		char *nl = strchr(p, '\n');
		lines[nlines++] = p;
		if (!nl)
			break;
		*nl = 0;
		p = nl + 1;
	}
	for (int i = 0; i < ks->n; i++) {
		int at = ks->line_of[i];
		if (at < 0 || at >= nlines || !key_matches(lines[at], ks->keys[i])) {
			ks->line_of[i] = -1;
			for (int j = 0; j < nlines; j++) {
				if (key_matches(lines[j], ks->keys[i])) {
					ks->line_of[i] = j;
					break;
				}
			}
			at = ks->line_of[i];
		}
		ks->values[i] = at >= 0 ? value_after_key(lines[at], ks->keys[i]) : 0;
	}
}

static int append_values(char *line, int len, int size, const struct keyset *ks)
{
	for (int i = 0; i < ks->n && len < size - 24; i++)
		len += snprintf(line + len, size - len, " %llu", ks->values[i]);
	return len;
}

static void sample(void)
{
	char line[8192];
	struct sysinfo si;
	long long t = now_ns();
	int len;
	sysinfo(&si);
	read_keys(&meminfo);
	read_keys(&vmstat);
	unsigned long long unit = si.mem_unit ? si.mem_unit : 1;
	len = snprintf(line, sizeof line, "s %llu %lld %llu %llu %llu", seq++, t,
		       (unsigned long long)si.totalram * unit / 1024,
		       (unsigned long long)si.freeram * unit / 1024,
		       (unsigned long long)si.freeswap * unit / 1024);
	len = append_values(line, len, sizeof line, &meminfo);
	len = append_values(line, len, sizeof line, &vmstat);
	line[len++] = '\n';
	if (every > 0 && seq % every == 1 % every) {
		read_keys(&fmeminfo);
		read_keys(&fvmstat);
		len += snprintf(line + len, sizeof line - len, "S %llu %lld", seq - 1, t);
		len = append_values(line, len, sizeof line, &fmeminfo);
		len = append_values(line, len, sizeof line, &fvmstat);
		line[len++] = '\n';
	}
	queue_sample(line, (size_t)len);
}

static void set_keys(struct keyset *ks, char *args)
{
	char *save = NULL, *word;
	ks->n = 0;
	for (word = strtok_r(args, " ", &save); word && ks->n < MAX_KEYS; word = strtok_r(NULL, " ", &save)) {
		snprintf(ks->keys[ks->n], KEY_LEN, "%s", word);
		ks->line_of[ks->n] = -1;
		ks->values[ks->n++] = 0;
	}
}

static void send_frame(const char *token, const char *path, const char *data, size_t len)
{
	char head[512];
	int n = snprintf(head, sizeof head, "f %s %s %zu\n", token, path, len);
	send_all(head, (size_t)n);
	send_all(data, len);
	send_all("\n", 1);
}

static int by_block_number(const struct dirent **a, const struct dirent **b)
{
	return atol((*a)->d_name + 6) - atol((*b)->d_name + 6);
}

static void snap_memblocks(const char *token)
{
	struct dirent **list;
	size_t used = 0;
	int n = scandir("/sys/devices/system/memory", &list, NULL, by_block_number);
	for (int i = 0; i < n; i++) {
		char path[512], state[64] = "", zones[128] = "";
		const char *name = list[i]->d_name;
		if (strncmp(name, "memory", 6) == 0 && name[6] >= '0' && name[6] <= '9') {
			snprintf(path, sizeof path, "/sys/devices/system/memory/%s/state", name);
			read_file(-1, path, state, sizeof state);
			snprintf(path, sizeof path, "/sys/devices/system/memory/%s/valid_zones", name);
			read_file(-1, path, zones, sizeof zones);
			state[strcspn(state, "\n")] = 0;
			zones[strcspn(zones, "\n")] = 0;
			if (used < sizeof filebuf - 256)
				used += snprintf(filebuf + used, sizeof filebuf - used, "%s %s %s\n",
						 name, state, zones);
		}
		free(list[i]);
	}
	if (n > 0)
		free(list);
	send_frame(token, "memblocks", filebuf, used);
}

static void snap_kmsg(const char *token)
{
	char rec[8192];
	size_t used = 0;
	int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	while (fd >= 0) {
		ssize_t n = read(fd, rec, sizeof rec - 1);
		if (n < 0 && errno == EPIPE)
			continue; /* records overwritten while reading: go on with the next */
		if (n <= 0)
			break;
		if (used + (size_t)n < sizeof filebuf) {
			memcpy(filebuf + used, rec, (size_t)n);
			used += (size_t)n;
		}
	}
	if (fd >= 0)
		close(fd);
	send_frame(token, "kmsg", filebuf, used);
}

static void command(char *cmd)
{
	char out[256];
	char *args = strchr(cmd, ' ');
	if (args)
		*args++ = 0;
	else
		args = cmd + strlen(cmd);
	if (strcmp(cmd, "interval") == 0) {
		flush();
		interval_ns = atoll(args);
	} else if (strcmp(cmd, "meminfo") == 0) {
		set_keys(&meminfo, args);
	} else if (strcmp(cmd, "vmstat") == 0) {
		set_keys(&vmstat, args);
	} else if (strcmp(cmd, "fmeminfo") == 0) {
		set_keys(&fmeminfo, args);
	} else if (strcmp(cmd, "fvmstat") == 0) {
		set_keys(&fvmstat, args);
	} else if (strcmp(cmd, "every") == 0) {
		every = atol(args);
	} else if (strcmp(cmd, "batch") == 0) {
		flush();
		batch = atol(args) > 0 ? atol(args) : 1;
	} else if (strcmp(cmd, "ping") == 0) {
		int n = snprintf(out, sizeof out, "pong %s %lld\n", args, now_ns());
		send_all(out, (size_t)n);
	} else if (strcmp(cmd, "cpu") == 0) {
		char stat[128] = "";
		read_file(-1, "/proc/self/schedstat", stat, sizeof stat);
		int n = snprintf(out, sizeof out, "cpu %s %llu\n", args, strtoull(stat, NULL, 10));
		send_all(out, (size_t)n);
	} else if (strcmp(cmd, "snap") == 0) {
		char *save = NULL, *token = strtok_r(args, " ", &save), *path;
		if (!token)
			return;
		while ((path = strtok_r(NULL, " ", &save))) {
			if (strcmp(path, "memblocks") == 0) {
				snap_memblocks(token);
			} else if (strcmp(path, "kmsg") == 0) {
				snap_kmsg(token);
			} else {
				ssize_t len = read_file(-1, path, filebuf, sizeof filebuf);
				send_frame(token, path, filebuf, len < 0 ? 0 : (size_t)len);
			}
		}
		int n = snprintf(out, sizeof out, "end %s\n", token);
		send_all(out, (size_t)n);
	}
}

/* The same for the stack the deepest paths will use. */
static void __attribute__((noinline)) prefault_stack(void)
{
	volatile char pad[64 * 1024];
	for (size_t i = 0; i < sizeof pad; i += 4096)
		pad[i] = 0;
}

int main(int argc, char **argv)
{
	static char inbuf[8192];
	size_t inlen = 0;
	long long next = 0;
	if (argc != 2) {
		fprintf(stderr, "usage: %s /dev/vportNpM\n", argv[0]);
		return 2;
	}
	port = open(argv[1], O_RDWR | O_CLOEXEC);
	if (port < 0) {
		perror(argv[1]);
		return 1;
	}
	/* Touch every buffer now, at boot: pages first touched later could land in memory that
	 * is hotplugged afterwards and would then have to be migrated when it is unplugged. */
	memset(filebuf, 0, sizeof filebuf);
	memset(outbuf, 0, sizeof outbuf);
	memset(inbuf, 0, sizeof inbuf);
	prefault_stack();
	{
		/* ... and the heap that scandir() will reuse for "memblocks" snapshots. */
		struct dirent **list;
		int n = scandir("/sys/devices/system/memory", &list, NULL, NULL);
		for (int i = 0; i < n; i++)
			free(list[i]);
		if (n > 0)
			free(list);
	}
	send_all("hello 1\n", 8);
	for (;;) {
		struct pollfd pfd = { port, POLLIN, 0 };
		struct timespec ts, *tsp = NULL;
		long long t = now_ns();
		if (interval_ns > 0) {
			long long wait = next - t;
			if (wait < 0)
				wait = 0;
			ts.tv_sec = wait / 1000000000LL;
			ts.tv_nsec = wait % 1000000000LL;
			tsp = &ts;
		}
		int r = ppoll(&pfd, 1, tsp, NULL);
		if (r > 0 && (pfd.revents & POLLIN)) {
			ssize_t n = read(port, inbuf + inlen, sizeof inbuf - 1 - inlen);
			if (n > 0) {
				char *nl;
				inlen += (size_t)n;
				inbuf[inlen] = 0;
				while ((nl = memchr(inbuf, '\n', inlen))) {
					long long before = interval_ns;
					*nl = 0;
					command(inbuf);
					if (interval_ns != before)
						next = now_ns(); /* new rate: first sample now */
					inlen -= (size_t)(nl + 1 - inbuf);
					memmove(inbuf, nl + 1, inlen);
				}
				if (inlen == sizeof inbuf - 1)
					inlen = 0; /* overlong garbage: drop */
			}
		} else if (r > 0 && (pfd.revents & (POLLHUP | POLLERR))) {
			usleep(10000); /* host not connected: do not spin */
		}
		if (interval_ns > 0 && now_ns() >= next) {
			sample();
			next += interval_ns;
			if (next < now_ns())
				next = now_ns() + interval_ns; /* fell behind: skip, do not burst */
		}
	}
}
