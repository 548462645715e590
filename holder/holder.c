/*
 * embedshim-holder: holds a pod's namespaces for the daemon's Sandbox service, in place of a
 * pause container (no image, no snapshot, no runc).
 *
 *   embedshim-holder [-cgroup DIR]... [-netns PATH] [-ipc] [-uts HOSTNAME] [-pid]
 *                    [-sysctl KEY=VALUE]...
 *
 * In this order: moves itself into each cgroup DIR (cgroup.procs: one per cgroup v1
 * hierarchy, and the unified one), joins the network namespace
 * PATH, unshares a fresh IPC namespace (-ipc) and UTS namespace with that hostname (-uts),
 * writes the sysctls (after the unshares: /proc/sys/net and the IPC ones are per namespace),
 * and with -pid unshares a PID namespace and forks its init.  Then it writes the pid that
 * holds the namespaces (the init's with -pid, its own otherwise) as a decimal line to stdout,
 * puts /dev/null on stdin, stdout and stderr (the daemon reads both to their end) and waits: SIGTERM or SIGINT ends it with status 0; as a PID namespace's init
 * it reaps every orphan of the pod.  Any failure before that is one line on stderr and exit
 * status 1 (nothing written to stdout), so the daemon tells success from failure by stdout.
 *
 * Before it announces itself it drops every capability (bounding set included) and sets
 * no_new_privs: from then on it only waits and reaps.
 *
 * The -pid parent exits right after its child has signalled readiness; the daemon is a child
 * subreaper, so the init becomes the daemon's child.
 */
#include <errno.h>
#include <linux/capability.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_SYSCTLS 128
#define MAX_CGROUPS 32

static void die(const char *what, const char *arg) {
    fprintf(stderr, "embedshim-holder: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "",
            strerror(errno));
    _exit(1);
}

static void usage(const char *why) {
    fprintf(stderr, "embedshim-holder: %s\n", why);
    _exit(2);
}

static void write_file(const char *path, const char *value) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die("open", path);
    size_t len = strlen(value);
    if (write(fd, value, len) != (ssize_t)len) die("write", path);
    close(fd);
}

/* net.ipv4.ip_forward=1 -> /proc/sys/net/ipv4/ip_forward; as runc does, a '/' in the key
 * is kept (net/ipv4/conf/eth0.100/...) and dots between components become '/'. */
static void set_sysctl(const char *kv) {
    const char *eq = strchr(kv, '=');
    if (eq == NULL || eq == kv) usage("-sysctl wants KEY=VALUE");
    char path[512];
    int n = snprintf(path, sizeof path, "/proc/sys/%.*s", (int)(eq - kv), kv);
    if (n < 0 || (size_t)n >= sizeof path) usage("-sysctl key too long");
    if (strstr(path, "..") != NULL) usage("-sysctl key with ..");
    int has_slash = memchr(kv, '/', (size_t)(eq - kv)) != NULL;
    if (!has_slash)
        for (char *p = path + 10; *p; p++)
            if (*p == '.') *p = '/';
    write_file(path, eq + 1);
}

/* Once the namespaces are made the holder needs no privilege: every capability goes (so
 * the pod's containers, which have fewer, may read /proc/1 of a shared PID namespace, as
 * with a pause container) and none can come back. */
static void drop_privileges(void) {
    for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) die("prctl", "PR_CAPBSET_DROP");
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &hdr, data) != 0) die("capset", NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("prctl", "PR_SET_NO_NEW_PRIVS");
}

/* Let go of the daemon's pipe: it reads it to the end. */
static void quiet(void) {
    int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (fd < 0) die("open", "/dev/null");
    for (int i = 0; i < 3; i++)
        if (dup2(fd, i) < 0) _exit(1);
    close(fd);
}

static volatile sig_atomic_t stop;

static void on_stop(int sig) {
    (void)sig;
    stop = 1;
}

static void on_child(int sig) { (void)sig; }

/* Wait for SIGTERM/SIGINT, reaping children (orphans of the pod when this is its init). */
static int hold(void) {
    sigset_t mask, old;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, &old);
    struct sigaction sa = {0};
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_child;
    sigaction(SIGCHLD, &sa, NULL);
    while (!stop) {
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
        if (stop) break;
        sigsuspend(&old);
    }
    return 0;
}

static void announce(pid_t pid) {
    char line[32];
    int n = snprintf(line, sizeof line, "%d\n", (int)pid);
    if (write(STDOUT_FILENO, line, (size_t)n) != n) die("write", "stdout");
}

int main(int argc, char **argv) {
    const char *netns = NULL, *hostname = NULL;
    const char *sysctls[MAX_SYSCTLS], *cgroups[MAX_CGROUPS];
    int nsysctl = 0, ncgroup = 0, ipc = 0, pidns = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "-cgroup") && more) {
            if (ncgroup == MAX_CGROUPS) usage("too many -cgroup");
            cgroups[ncgroup++] = argv[++i];
        } else if (!strcmp(a, "-netns") && more) netns = argv[++i];
        else if (!strcmp(a, "-uts") && more) hostname = argv[++i];
        else if (!strcmp(a, "-ipc")) ipc = 1;
        else if (!strcmp(a, "-pid")) pidns = 1;
        else if (!strcmp(a, "-sysctl") && more) {
            if (nsysctl == MAX_SYSCTLS) usage("too many -sysctl");
            sysctls[nsysctl++] = argv[++i];
        } else usage("bad arguments (see holder.c)");
    }
    for (int i = 0; i < ncgroup; i++) {
        char path[4096];
        int n = snprintf(path, sizeof path, "%s/cgroup.procs", cgroups[i]);
        if (n < 0 || (size_t)n >= sizeof path) usage("-cgroup too long");
        write_file(path, "0");
    }
    if (netns != NULL) {
        int fd = open(netns, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die("open", netns);
        if (setns(fd, CLONE_NEWNET) != 0) die("setns", netns);
        close(fd);
    }
    int flags = (ipc ? CLONE_NEWIPC : 0) | (hostname ? CLONE_NEWUTS : 0);
    if (flags && unshare(flags) != 0) die("unshare", NULL);
    if (hostname != NULL && *hostname && sethostname(hostname, strlen(hostname)) != 0)
        die("sethostname", hostname);
    for (int i = 0; i < nsysctl; i++) set_sysctl(sysctls[i]);
    if (!pidns) {
        drop_privileges();
        announce(getpid());
        quiet();
        return hold();
    }
    if (unshare(CLONE_NEWPID) != 0) die("unshare", "pid");
    int ready[2];
    if (pipe2(ready, O_CLOEXEC) != 0) die("pipe", NULL);
    pid_t child = fork();
    if (child < 0) die("fork", NULL);
    if (child == 0) {
        close(ready[0]);
        drop_privileges();
        quiet();
        if (write(ready[1], "r", 1) != 1) _exit(1);
        close(ready[1]);
        _exit(hold());
    }
    close(ready[1]);
    char c;
    if (read(ready[0], &c, 1) != 1) {
        errno = ECHILD;
        die("init", "did not start");
    }
    announce(child);
    return 0;
}
