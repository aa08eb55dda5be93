/*
 * dynamem-sampler: the guest half of dynamem's measurement channel.
 *
 * Why a static C program: under TCG a shell loop that forks `cat` 200 times a second
 * perturbs the very guest it measures. This reads /proc with open/read only, sends one
 * short line per sample over a virtio-serial port, and the host timestamps each line on
 * arrival. The host steers it with one-line commands on the same port.
 *
 * Why a schedule instead of a fixed rate: under TCG every wake-up of the guest costs about
 * half a millisecond of emulated time, and every write to the port a virtqueue kick on top.
 * A fixed 500 Hz cost 30% of a vCPU, competing with exactly the work being timed. So the
 * interval between checks grows with the time since the schedule started (a completion
 * seen t seconds after the request then carries an uncertainty that is a fixed share of t),
 * a check sends a line only when something the host asked about changed, and hotplug of
 * memory blocks wakes the sampler at once through the kernel's uevents.
 *
 *   schedule <floor_ns> <cap_ns> <ppm>
 *                             check every clamp(ppm * elapsed / 1e6, floor, cap), elapsed
 *                             since this command; the first check is at once and always
 *                             sent (floor 0 stops checking)
 *   full <floor_ns> <cap_ns> <ppm>
 *                             a full record with the first check due on this schedule
 *                             (same clock; floor 0: never)
 *   budget <ppm>              never use more than this share of one CPU (ppm of the time
 *                             since the schedule started; 0: no limit): a look waits until
 *                             the CPU this sampler used since then is within the budget.
 *                             What a look costs differs 100-fold between KVM and TCG, and
 *                             again with a busy guest; the budget holds on all of them and
 *                             the looks it affords set the resolution the host reports
 *   onchange <0|1>            1: send a check only when totalram or a carried meminfo/vmstat
 *                             field changed, or with a full record; 0: send every check
 *   uevent <0|1>              1: a memory-block uevent (add, online, offline, remove) makes
 *                             a check at once, or as soon as the budget affords one
 *   meminfo <key>...          /proc/meminfo fields carried in each sample (kB)
 *   vmstat <key>...           /proc/vmstat fields carried in each sample
 *   fmeminfo <key>...         /proc/meminfo fields of the full record (kB)
 *   fvmstat <key>...          /proc/vmstat fields of the full record
 *   ping <token>              answered at once with
 *                             "pong <token> <guest_ns> <last_check_ns> <checks> <uevent_checks>":
 *                             a barrier that also says how far the sampler has looked, and
 *                             how many of its looks a uevent caused (sent or not: a look
 *                             that finds what an earlier timer look already saw is not sent)
 *   snap <token> <path>...    whole files, framed as "f <token> <path> <bytes>\n<bytes>\n";
 *                             the path "memblocks" lists memory blocks, state, valid zones;
 *                             "kmsg" is the kernel log as /dev/kmsg records (no dmesg
 *                             process, so nothing new is allocated while a resize is measured)
 *   cpu <token>               "cpu <token> <ns> <guest_ns>": CPU time this sampler has
 *                             used, from /proc/self/schedstat (exact, unlike tick-sampled
 *                             utime), and the guest's clock
 *
 * It sends "hello 3" at start; each sent check is
 *   s <check> <guest_ns> <prev_check_ns> <cause> <totalram_kB> <freeram_kB> <freeswap_kB>
 *     <meminfo...> <vmstat...>
 * (cause 0 timer, 1 uevent, 2 first check of a schedule, 3 the last, with a full record;
 * prev_check_ns is the guest time of
 * the check before, sent or not, so the host knows when the old value was last seen), and a
 * check with a full record due is followed by
 *   S <check> <guest_ns> <fmeminfo...> <fvmstat...>
 * Checks time a resize; full records (at a lower rate) show what it cost.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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

/* Intervals clamp(ppm * elapsed / 1e6, floor, cap); floor 0 means off. */
struct schedule {
	long long floor_ns, cap_ns, ppm;
	long long next; /* guest monotonic ns of the next due time */
};

static int port = -1;
static int uevents = -1; /* NETLINK_KOBJECT_UEVENT socket while "uevent 1" */
static long long t0;	 /* start of the current schedule */
static long long cpu0;	 /* this process's CPU time then */
static long long budget_ppm;
static int uevent_pending; /* a memory-block uevent the budget has not afforded a look for */
static struct schedule checks, fulls;
static int onchange;
static unsigned long long nchecks;
static unsigned long long nuevent_checks; /* of nchecks, those a uevent caused, sent or not */
static long long last_check_ns;
static unsigned long long last_sent[1 + MAX_KEYS * 2]; /* totalram + carried fields */
static int have_sent;
static struct keyset meminfo = { .path = "/proc/meminfo", .fd = -1 };
static struct keyset vmstat = { .path = "/proc/vmstat", .fd = -1 };
static struct keyset fmeminfo = { .path = "/proc/meminfo", .fd = -1 };
static struct keyset fvmstat = { .path = "/proc/vmstat", .fd = -1 };
static char filebuf[BUF_SIZE];

static long long cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

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

static void send_all(const char *buf, size_t len)
{
	write_all(buf, len);
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

static long long interval_at(const struct schedule *s, long long t)
{
	long long iv = (t - t0) / 1000 * s->ppm / 1000;
	if (iv < s->floor_ns)
		iv = s->floor_ns;
	if (iv > s->cap_ns)
		iv = s->cap_ns;
	return iv;
}

/* When the CPU used since the schedule's first look fits the budget again. */
static long long affordable(void)
{
	if (budget_ppm <= 0)
		return 0;
	return t0 + (cpu_ns() - cpu0) * 1000 / budget_ppm * 1000;
}

/* The next look: an interval after this one, and not before it is affordable. */
static long long next_look(long long t)
{
	long long next = t + interval_at(&checks, t);
	long long a = affordable();
	return a > next ? a : next;
}

/* Did anything the host watches change since the last line sent? Also remembers it. */
static int changed(unsigned long long totalram)
{
	unsigned long long now[1 + MAX_KEYS * 2];
	int n = 0, diff;
	now[n++] = totalram;
	for (int i = 0; i < meminfo.n; i++)
		now[n++] = meminfo.values[i];
	for (int i = 0; i < vmstat.n; i++)
		now[n++] = vmstat.values[i];
	diff = !have_sent || memcmp(now, last_sent, n * sizeof now[0]) != 0;
	memcpy(last_sent, now, n * sizeof now[0]);
	have_sent = 1;
	return diff;
}

/* One look at the guest's memory; sent when it changed, when asked to send every check, on
 * a schedule's first check, and with every full record. */
static void check(int cause, long long t)
{
	char line[8192];
	struct sysinfo si;
	long long prev = last_check_ns && cause != 2 ? last_check_ns : t;
	int len, full;
	sysinfo(&si);
	read_keys(&meminfo);
	read_keys(&vmstat);
	nchecks++;
	nuevent_checks += cause == 1;
	last_check_ns = t;
	unsigned long long unit = si.mem_unit ? si.mem_unit : 1;
	unsigned long long totalram = (unsigned long long)si.totalram * unit / 1024;
	full = fulls.floor_ns > 0 && t >= fulls.next;
	if (full)
		fulls.next = t + interval_at(&fulls, t);
	if (!changed(totalram) && onchange && !full && cause < 2)
		return;
	len = snprintf(line, sizeof line, "s %llu %lld %lld %d %llu %llu %llu", nchecks, t, prev,
		       cause, totalram, (unsigned long long)si.freeram * unit / 1024,
		       (unsigned long long)si.freeswap * unit / 1024);
	len = append_values(line, len, sizeof line, &meminfo);
	len = append_values(line, len, sizeof line, &vmstat);
	line[len++] = '\n';
	if (full) {
		read_keys(&fmeminfo);
		read_keys(&fvmstat);
		len += snprintf(line + len, sizeof line - len, "S %llu %lld", nchecks, t);
		len = append_values(line, len, sizeof line, &fmeminfo);
		len = append_values(line, len, sizeof line, &fvmstat);
		line[len++] = '\n';
	}
	send_all(line, (size_t)len);
}

/* Memory blocks announce add, online, offline and remove; nothing else wakes the sampler. */
static void open_uevents(void)
{
	struct sockaddr_nl addr = { .nl_family = AF_NETLINK, .nl_groups = 1 };
	if (uevents >= 0)
		return;
	uevents = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK,
			 NETLINK_KOBJECT_UEVENT);
	if (uevents >= 0 && bind(uevents, (struct sockaddr *)&addr, sizeof addr) < 0) {
		close(uevents);
		uevents = -1;
	}
}

/* Drain pending uevents; true if one was about a memory block. */
static int memory_uevent(void)
{
	char msg[4096];
	int memory = 0;
	ssize_t n;
	while ((n = recv(uevents, msg, sizeof msg - 1, 0)) > 0) {
		msg[n] = 0;
		for (char *p = msg; p < msg + n; p += strlen(p) + 1)
			if (strcmp(p, "SUBSYSTEM=memory") == 0)
				memory = 1;
	}
	return memory;
}

static void set_schedule(struct schedule *s, char *args)
{
	long long floor_ns = 0, cap_ns = 0, ppm = 0;
	sscanf(args, "%lld %lld %lld", &floor_ns, &cap_ns, &ppm);
	s->floor_ns = floor_ns > 0 ? floor_ns : 0;
	s->cap_ns = cap_ns > s->floor_ns ? cap_ns : s->floor_ns;
	s->ppm = ppm > 0 ? ppm : 0;
	s->next = now_ns();
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
	if (strcmp(cmd, "schedule") == 0) {
		if (checks.floor_ns > 0 && fulls.floor_ns > 0 && atoll(args) <= 0) {
			/* a schedule ends with a full record of the final state, for the figures */
			fulls.next = 0;
			check(3, now_ns());
		}
		set_schedule(&checks, args);
		t0 = checks.next;
		cpu0 = cpu_ns();
		uevent_pending = 0;
		fulls.next = t0;
		if (checks.floor_ns > 0) {
			check(2, t0);
			cpu0 = cpu_ns(); /* the baseline, before the request, is not charged */
			checks.next = next_look(t0);
		}
	} else if (strcmp(cmd, "full") == 0) {
		set_schedule(&fulls, args);
	} else if (strcmp(cmd, "budget") == 0) {
		budget_ppm = atoll(args) > 0 ? atoll(args) : 0;
	} else if (strcmp(cmd, "onchange") == 0) {
		onchange = atoi(args);
	} else if (strcmp(cmd, "uevent") == 0) {
		if (atoi(args)) {
			open_uevents();
		} else if (uevents >= 0) {
			close(uevents);
			uevents = -1;
		}
	} else if (strcmp(cmd, "meminfo") == 0) {
		set_keys(&meminfo, args);
	} else if (strcmp(cmd, "vmstat") == 0) {
		set_keys(&vmstat, args);
	} else if (strcmp(cmd, "fmeminfo") == 0) {
		set_keys(&fmeminfo, args);
	} else if (strcmp(cmd, "fvmstat") == 0) {
		set_keys(&fvmstat, args);
	} else if (strcmp(cmd, "ping") == 0) {
		int n = snprintf(out, sizeof out, "pong %s %lld %lld %llu %llu\n", args, now_ns(),
				 last_check_ns, nchecks, nuevent_checks);
		send_all(out, (size_t)n);
	} else if (strcmp(cmd, "cpu") == 0) {
		char stat[128] = "";
		read_file(-1, "/proc/self/schedstat", stat, sizeof stat);
		int n = snprintf(out, sizeof out, "cpu %s %llu %lld\n", args, strtoull(stat, NULL, 10),
				 now_ns());
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
	send_all("hello 3\n", 8);
	/* Under TCG the guest's clocksource is usually the emulated HPET (the TSC is marked
	 * unstable), so every clock read is a system call and an emulated MMIO access: one per
	 * wake-up, reused for the look and for the next timeout. */
	long long t = now_ns();
	for (;;) {
		struct pollfd pfd[2] = { { port, POLLIN, 0 }, { uevents, POLLIN, 0 } };
		struct timespec ts, *tsp = NULL;
		if (checks.floor_ns > 0) {
			long long wait = checks.next - t;
			if (wait < 0)
				wait = 0;
			ts.tv_sec = wait / 1000000000LL;
			ts.tv_nsec = wait % 1000000000LL;
			tsp = &ts;
		}
		int r = ppoll(pfd, uevents >= 0 ? 2 : 1, tsp, NULL);
		t = now_ns();
		if (r > 0 && (pfd[0].revents & POLLIN)) {
			ssize_t n = read(port, inbuf + inlen, sizeof inbuf - 1 - inlen);
			if (n > 0) {
				char *nl;
				inlen += (size_t)n;
				inbuf[inlen] = 0;
				while ((nl = memchr(inbuf, '\n', inlen))) {
					*nl = 0;
					command(inbuf);
					inlen -= (size_t)(nl + 1 - inbuf);
					memmove(inbuf, nl + 1, inlen);
				}
				if (inlen == sizeof inbuf - 1)
					inlen = 0; /* overlong garbage: drop */
				t = now_ns();
			}
		} else if (r > 0 && (pfd[0].revents & (POLLHUP | POLLERR))) {
			usleep(10000); /* host not connected: do not spin */
		}
		if (r > 0 && uevents >= 0 && (pfd[1].revents & POLLIN) && memory_uevent())
			uevent_pending = checks.floor_ns > 0;
		if (uevent_pending) { /* brings the next look forward, to when it is affordable */
			long long a = affordable();
			if (a < checks.next)
				checks.next = a > t ? a : t;
		}
		if (checks.floor_ns > 0 && t >= checks.next) {
			check(uevent_pending ? 1 : 0, t);
			uevent_pending = 0;
			checks.next = next_look(t); /* no bursts, within the budget */
		}
	}
}
