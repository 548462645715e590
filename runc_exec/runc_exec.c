/* embedshim-runc-exec: runc_exec.py in C, the same command line, sync lines, status file and
 * exit codes (runc_exec/README.md), without a Python interpreter's start-up on every exec.
 *
 * A child subreaper that runs `runc exec --detach`, so the detached process is re-parented to
 * it and stays its zombie until its status is in the status file: no exit can be missed. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define EXIT_OK 0    /* "exit" sent and the status file written */
#define EXIT_ERR 1   /* "error" sent: no exec'd process to track */
#define EXIT_USAGE 2 /* bad command line or sync fd: message on stderr only */
#define EXIT_LOST 3  /* "pid" sent, but the status could not be recorded */

#define USAGE                                                                                \
    "usage: runc_exec.py --sync-fd N --status-file PATH [--runc PATH] --root DIR"            \
    " [--log FILE] [--systemd-cgroup] [--timeout SECONDS] --pid-file FILE"                   \
    " --process FILE [--console-socket PATH] [--nofile SOFT] CONTAINER_ID"

extern char **environ;

static const char *VALUED[] = {"--sync-fd",  "--status-file", "--runc",     "--root",
                               "--log",      "--timeout",     "--pid-file", "--process",
                               "--console-socket", "--nofile"};
enum { O_SYNC_FD, O_STATUS, O_RUNC, O_ROOT, O_LOG, O_TIMEOUT, O_PIDFILE, O_PROCESS, O_CONSOLE,
       O_NOFILE, N_VALUED };
static const int REQUIRED[] = {O_SYNC_FD, O_STATUS, O_ROOT, O_PIDFILE, O_PROCESS};

static const char *val[N_VALUED];
static int systemd_cgroup;
static const char *container_id;
static int sync_fd = -1, sync_alive = 1;
static int reset_sig[NSIG];
static volatile sig_atomic_t timed_out;

/* ------------------------------------------------------------------ sync channel */

static void sync_send(const char *fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    for (int i = 0; i < n; i++)
        if (buf[i] == '\n')
            buf[i] = ' ';
    buf[n++] = '\n';
    if (!sync_alive)
        return;
    for (int off = 0; off < n;) {
        ssize_t w = write(sync_fd, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            sync_alive = 0; /* the daemon is gone: drop the lines, still write the file */
            return;
        }
        off += w;
    }
}

static void stdio_to_devnull(void) {
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0) {
        close(0), close(1), close(2);
        return;
    }
    for (int fd = 0; fd < 3; fd++)
        dup2(null, fd);
    close(null);
}

static int fail(const char *fmt, ...) {
    char buf[3072];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    stdio_to_devnull();
    sync_send("error %s", buf);
    return EXIT_ERR;
}

/* ------------------------------------------------------------------ command line */

static int usage(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    dprintf(2, "runc_exec: %s\n%s\n", buf, USAGE);
    return EXIT_USAGE;
}

static int to_long(const char *s, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    while (*end == ' ' || *end == '\t' || *end == '\n')
        end++;
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv) {
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "--systemd-cgroup")) {
            systemd_cgroup = 1;
            continue;
        }
        if (!strcmp(arg, "--")) {
            for (i++; i < argc; i++, npos++)
                container_id = argv[i];
            break;
        }
        if (!strncmp(arg, "--", 2)) {
            const char *eq = strchr(arg, '=');
            size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
            int k = -1;
            for (int j = 0; j < N_VALUED; j++)
                if (strlen(VALUED[j]) == len && !strncmp(arg, VALUED[j], len))
                    k = j;
            if (k >= 0) {
                if (eq)
                    val[k] = eq + 1;
                else if (i + 1 == argc)
                    return usage("%s needs a value", VALUED[k]);
                else
                    val[k] = argv[++i];
                continue;
            }
        }
        if (arg[0] == '-')
            return usage("unknown option %s", arg);
        container_id = arg;
        npos++;
    }
    char missing[256] = "";
    for (size_t j = 0; j < sizeof REQUIRED / sizeof REQUIRED[0]; j++)
        if (!val[REQUIRED[j]]) {
            if (*missing)
                strcat(missing, ", ");
            strcat(missing, VALUED[REQUIRED[j]]);
        }
    if (*missing)
        return usage("missing %s", missing);
    if (npos != 1)
        return usage("exactly one container id is needed");
    long n;
    if (to_long(val[O_SYNC_FD], &n) || n > 0x7fffffff || n < -1)
        return usage("invalid --sync-fd %s", val[O_SYNC_FD]);
    sync_fd = (int)n;
    if (val[O_TIMEOUT]) {
        char *end;
        strtod(val[O_TIMEOUT], &end);
        if (end == val[O_TIMEOUT] || *end)
            return usage("invalid --timeout %s", val[O_TIMEOUT]);
    }
    if (val[O_NOFILE] && to_long(val[O_NOFILE], &n))
        return usage("invalid --nofile %s", val[O_NOFILE]);
    if (sync_fd < 3)
        return usage("--sync-fd must be 3 or more: 0, 1 and 2 are the exec's stdio");
    return 0;
}

/* ------------------------------------------------------------------ set-up */

static int keep_default(int sig) {
    switch (sig) {
    case SIGKILL: case SIGSTOP: case SIGCHLD: case SIGSEGV: case SIGBUS:
    case SIGFPE: case SIGILL: case SIGABRT: case SIGTRAP: case SIGSYS:
        return 1;
    }
    return sig >= 32 && sig < SIGRTMIN; /* glibc's own (32, 33): reset raw in the child */
}

/* Survive the daemon's (or a terminal's) signals so the status still gets recorded; runc
 * gets every one back at its default (an ignored disposition survives execve). */
static void ignore_signals(void) {
    struct sigaction sa = {.sa_handler = SIG_IGN};
    sigemptyset(&sa.sa_mask);
    for (int sig = 1; sig < NSIG; sig++)
        if (!keep_default(sig) && sigaction(sig, &sa, NULL) == 0)
            reset_sig[sig] = 1;
}

static void close_stray_fds(void) {
    if (syscall(SYS_close_range, 3, sync_fd - 1, 0) == 0 &&
        syscall(SYS_close_range, sync_fd + 1, ~0U, 0) == 0)
        return;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return;
    int dfd = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') {
            int fd = atoi(e->d_name);
            if (fd > 2 && fd != sync_fd && fd != dfd)
                close(fd);
        }
    closedir(d);
}

/* ------------------------------------------------------------------ runc */

static void on_alarm(int sig) {
    (void)sig;
    timed_out = 1;
}

/* fork + exec runc with every signal at its default and none blocked.  Not posix_spawn:
 * glibc's sets its reserved signals 32 and 33 to SIG_IGN in the child, and runc and the
 * exec'd process would keep that.  An exec error comes back through a close-on-exec pipe. */
static pid_t spawn(char **argv, char *err, size_t errlen) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        close(p[0]), close(p[1]);
        return -1;
    }
    if (pid == 0) {
        close(p[0]);
        unsigned long act[4] = {0}; /* kernel struct sigaction: SIG_DFL, no flags, no mask */
        for (int sig = 32; sig < SIGRTMIN; sig++)
            syscall(SYS_rt_sigaction, sig, act, NULL, 8);
        for (int sig = 1; sig < NSIG; sig++)
            if (reset_sig[sig])
                signal(sig, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        int e = ENOENT;
        if (strchr(argv[0], '/')) {
            execve(argv[0], argv, environ);
            e = errno;
        } else {
            const char *path = getenv("PATH");
            if (!path)
                path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin";
            char buf[4096];
            for (const char *s = path;; s++) {
                const char *c = strchrnul(s, ':');
                int len = (int)(c - s);
                snprintf(buf, sizeof buf, "%.*s/%s", len, len ? s : ".", argv[0]);
                execve(buf, argv, environ);
                if (errno != ENOENT || e == ENOENT)
                    e = errno;
                if (!*c)
                    break;
                s = c;
            }
        }
        char msg[4200];
        int n = snprintf(msg, sizeof msg, "[Errno %d] %s: '%s'", e, strerror(e), argv[0]);
        if (write(p[1], msg, n) < 0)
            _exit(127);
        _exit(127);
    }
    close(p[1]);
    ssize_t n;
    do
        n = read(p[0], err, errlen - 1);
    while (n < 0 && errno == EINTR);
    close(p[0]);
    if (n > 0) {
        err[n] = 0;
        waitpid(pid, NULL, 0);
        return -1;
    }
    return pid;
}

/* Run runc to completion; its wait status, or -1 (err set), or -2 on timeout. */
static int run_runc(char **argv, double timeout, char *err, size_t errlen) {
    pid_t pid = spawn(argv, err, errlen);
    if (pid < 0)
        return -1;
    if (timeout > 0) {
        struct sigaction sa = {.sa_handler = on_alarm}; /* no SA_RESTART: waitpid returns */
        sigemptyset(&sa.sa_mask);
        sigaction(SIGALRM, &sa, NULL);
        struct itimerval it = {.it_value = {(time_t)timeout,
                                            (suseconds_t)((timeout - (time_t)timeout) * 1e6)}};
        if (!it.it_value.tv_sec && !it.it_value.tv_usec)
            it.it_value.tv_usec = 1;
        setitimer(ITIMER_REAL, &it, NULL);
    }
    int status = 0;
    for (;;) {
        if (waitpid(pid, &status, 0) == pid)
            break;
        if (errno != EINTR) {
            snprintf(err, errlen, "waitpid: %s", strerror(errno));
            status = -1;
            break;
        }
        if (timed_out) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            status = -2;
            break;
        }
    }
    if (timeout > 0) {
        struct itimerval off = {0};
        setitimer(ITIMER_REAL, &off, NULL);
        signal(SIGALRM, SIG_IGN);
    }
    return status;
}

/* ------------------------------------------------------------------ runc's error */

static char *read_all(int fd, off_t offset) {
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap + 1);
    if (!buf)
        return NULL;
    for (;;) {
        if (len == cap) {
            char *b = realloc(buf, 2 * cap + 1);
            if (!b)
                break;
            buf = b, cap *= 2;
        }
        ssize_t n = pread(fd, buf + len, cap - len, offset + len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += n;
    }
    buf[len] = 0;
    return buf;
}

static const char *skip_ws(const char *s) {
    while (*s == ' ' || *s == '\t' || *s == '\r')
        s++;
    return s;
}

static void put_utf8(char **o, unsigned cp) {
    char *p = *o;
    if (cp < 0x80)
        *p++ = cp;
    else if (cp < 0x800)
        *p++ = 0xc0 | cp >> 6, *p++ = 0x80 | (cp & 0x3f);
    else if (cp < 0x10000)
        *p++ = 0xe0 | cp >> 12, *p++ = 0x80 | (cp >> 6 & 0x3f), *p++ = 0x80 | (cp & 0x3f);
    else
        *p++ = 0xf0 | cp >> 18, *p++ = 0x80 | (cp >> 12 & 0x3f),
        *p++ = 0x80 | (cp >> 6 & 0x3f), *p++ = 0x80 | (cp & 0x3f);
    *o = p;
}

static unsigned hex4(const char *s, int *ok) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            *ok = 0;
    }
    return v;
}

/* A JSON string at *s (at its opening quote): decoded into out (if not NULL, at least as
 * long as the input); *s moves past it.  -1 if it is not a well-formed string. */
static int json_string(const char **s, char *out) {
    const char *p = *s;
    if (*p++ != '"')
        return -1;
    char *o = out;
    for (;;) {
        unsigned char c = *p++;
        if (!c || c == '\n')
            return -1;
        if (c == '"')
            break;
        if (c != '\\') {
            if (o)
                *o++ = c;
            continue;
        }
        c = *p++;
        unsigned cp = c;
        switch (c) {
        case 'n': cp = '\n'; break;
        case 't': cp = '\t'; break;
        case 'r': cp = '\r'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case '"': case '\\': case '/': break;
        case 'u': {
            int ok = 1;
            cp = hex4(p, &ok);
            if (!ok)
                return -1;
            p += 4;
            if (cp >= 0xd800 && cp < 0xdc00 && p[0] == '\\' && p[1] == 'u') {
                unsigned lo = hex4(p + 2, &ok);
                if (ok && lo >= 0xdc00 && lo < 0xe000) {
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    p += 6;
                }
            }
            break;
        }
        default:
            return -1;
        }
        if (o)
            put_utf8(&o, cp);
    }
    if (o)
        *o = 0;
    *s = p;
    return 0;
}

/* Skip any JSON value that is not a string (numbers, literals, nested objects and arrays). */
static int json_skip(const char **s) {
    const char *p = *s;
    if (*p == '"')
        return json_string(s, NULL);
    int depth = 0;
    for (;;) {
        char c = *p;
        if (!c || c == '\n')
            return depth ? -1 : (*s = p, 0);
        if (c == '"') {
            if (json_string(&p, NULL))
                return -1;
            continue;
        }
        if (c == '{' || c == '[')
            depth++;
        else if (c == '}' || c == ']') {
            if (!depth)
                return *s = p, 0;
            depth--;
        } else if (c == ',' && !depth)
            return *s = p, 0;
        p++;
    }
}

/* The "msg" of a log line whose "level" is error or fatal, into msg (as long as the line). */
static int error_line(const char *line, char *msg) {
    const char *p = skip_ws(line);
    if (*p++ != '{')
        return 0;
    int is_error = 0, has_msg = 0;
    char *key = malloc(strlen(line) + 1), *value = malloc(strlen(line) + 1);
    if (!key || !value)
        goto out;
    *msg = 0;
    for (p = skip_ws(p); *p != '}';) {
        if (json_string(&p, key))
            goto out;
        p = skip_ws(p);
        if (*p++ != ':')
            goto out;
        p = skip_ws(p);
        if (*p == '"') {
            if (json_string(&p, value))
                goto out;
            if (!strcmp(key, "level"))
                is_error = !strcmp(value, "error") || !strcmp(value, "fatal");
            else if (!strcmp(key, "msg"))
                strcpy(msg, value), has_msg = 1;
        } else {
            if (!strcmp(key, "level"))
                is_error = 0;
            else if (!strcmp(key, "msg"))
                *msg = 0, has_msg = 0; /* not a string: Python's str() of it; rare */
            if (json_skip(&p))
                goto out;
        }
        p = skip_ws(p);
        if (*p == ',')
            p = skip_ws(p + 1);
        else if (*p != '}')
            goto out;
    }
    free(key), free(value);
    (void)has_msg;
    return is_error;
out:
    free(key), free(value);
    return 0;
}

/* The last error runc wrote to its JSON log from offset, stripped, into out. */
static void last_error(char *data, char *out, size_t outlen) {
    *out = 0;
    size_t len = strlen(data);
    char *msg = malloc(len + 1);
    if (!msg)
        return;
    char *end = data + len;
    while (end > data) {
        char *start = end;
        while (start > data && start[-1] != '\n')
            start--;
        char saved = *end;
        *end = 0;
        int hit = error_line(start, msg);
        *end = saved;
        if (hit) {
            char *m = msg;
            while (*m == ' ' || *m == '\t' || *m == '\n' || *m == '\r')
                m++;
            size_t n = strlen(m);
            while (n && (m[n - 1] == ' ' || m[n - 1] == '\t' || m[n - 1] == '\n' ||
                         m[n - 1] == '\r'))
                n--;
            m[n] = 0;
            snprintf(out, outlen, "%s", m);
            break;
        }
        end = start > data ? start - 1 : data;
    }
    free(msg);
}

static void runc_error(const char *log, int log_fd, off_t offset, char *out, size_t outlen) {
    *out = 0;
    int fd = log_fd >= 0 ? log_fd : open(log, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    char *data = read_all(fd, log_fd >= 0 ? 0 : offset);
    if (log_fd < 0)
        close(fd);
    if (data)
        last_error(data, out, outlen);
    free(data);
}

/* ------------------------------------------------------------------ the exec'd process */

static int read_pid(const char *path, long *pid) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[65];
    ssize_t n = read(fd, buf, 64);
    int e = errno;
    close(fd);
    if (n < 0)
        return errno = e, -1;
    buf[n] = 0;
    char *s = buf;
    while (*s == ' ' || *s == '\n' || *s == '\t')
        s++;
    if (to_long(s, pid))
        return errno = EINVAL, -1;
    return 0;
}

/* (ppid, start time in clock ticks): fields 4 and 22 of /proc/<pid>/stat. */
static int proc_stat(long pid, long *ppid, unsigned long long *start) {
    char path[64], buf[4097];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, 4096);
    int e = errno;
    close(fd);
    if (n < 0)
        return errno = e, -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the name may hold spaces and parentheses */
    if (!p)
        return errno = EINVAL, -1;
    char state;
    if (sscanf(p + 2, "%c %ld %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s "
                      "%*s %llu",
               &state, ppid, start) != 3)
        return errno = EINVAL, -1;
    return 0;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Block until pid exits, reaping stray orphans meanwhile; leave pid a zombie (so its pid
 * cannot be reused before the status is on disk).  containerd's status, or -1. */
static int wait_exit(pid_t pid, long long *at) {
    for (;;) {
        siginfo_t info = {0};
        if (waitid(P_ALL, 0, &info, WEXITED | WNOWAIT) < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        *at = now_ns();
        if (info.si_pid == 0)
            continue;
        if (info.si_pid != pid) {
            while (waitpid(info.si_pid, NULL, 0) < 0 && errno == EINTR)
                ;
            continue;
        }
        return info.si_code == CLD_EXITED ? info.si_status : 128 + info.si_status;
    }
}

static int write_status_file(const char *path, int status, long long at) {
    char tmp[4200], data[64];
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    int n = snprintf(data, sizeof data, "%d %lld\n", status, at);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    int ok = write(fd, data, n) == n;
    ok = (close(fd) == 0) && ok;
    if (ok && rename(tmp, path) == 0)
        return 0;
    unlink(tmp);
    return -1;
}

/* ------------------------------------------------------------------ main */

static int run(void) {
    ignore_signals();
    close_stray_fds();
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0)
        return fail("prctl(PR_SET_CHILD_SUBREAPER) failed");
    if (val[O_NOFILE]) {
        long soft = atol(val[O_NOFILE]);
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
            return fail("cannot set the open-file limit to %ld: %s", soft, strerror(errno));
        rl.rlim_cur = (rlim_t)soft;
        if (soft < 0 || setrlimit(RLIMIT_NOFILE, &rl) != 0)
            return fail("cannot set the open-file limit to %ld: %s", soft,
                        soft < 0 ? "negative" : strerror(errno));
    }

    char memlog[64];
    const char *log;
    int log_fd = -1;
    off_t offset = 0;
    if (val[O_LOG]) {
        struct stat st;
        log = val[O_LOG];
        offset = stat(log, &st) == 0 ? st.st_size : 0;
    } else {
        /* A private log: runc reopens our memfd by path, so nothing is left on disk. */
        log_fd = memfd_create("runc-log", MFD_CLOEXEC);
        if (log_fd < 0)
            return fail("memfd_create: %s", strerror(errno));
        snprintf(memlog, sizeof memlog, "/proc/%d/fd/%d", (int)getpid(), log_fd);
        log = memlog;
    }

    const char *runc = val[O_RUNC] ? val[O_RUNC] : "runc";
    char *argv[24];
    int a = 0;
    argv[a++] = (char *)runc;
    argv[a++] = "--root", argv[a++] = (char *)val[O_ROOT];
    argv[a++] = "--log", argv[a++] = (char *)log;
    argv[a++] = "--log-format", argv[a++] = "json";
    if (systemd_cgroup)
        argv[a++] = "--systemd-cgroup";
    argv[a++] = "exec", argv[a++] = "--detach";
    argv[a++] = "--pid-file", argv[a++] = (char *)val[O_PIDFILE];
    argv[a++] = "--process", argv[a++] = (char *)val[O_PROCESS];
    if (val[O_CONSOLE] && *val[O_CONSOLE])
        argv[a++] = "--console-socket", argv[a++] = (char *)val[O_CONSOLE];
    argv[a++] = (char *)container_id;
    argv[a] = NULL;

    double timeout = val[O_TIMEOUT] ? strtod(val[O_TIMEOUT], NULL) : 0;
    char err[4096];
    int status = run_runc(argv, timeout, err, sizeof err);
    if (status == -1)
        return fail("cannot run %s: %s", runc, err);
    if (status == -2)
        return fail("runc exec timed out after %gs", timeout);
    if (status != 0) {
        runc_error(log, log_fd, offset, err, sizeof err);
        if (*err)
            return fail("%s", err);
        if (WIFSIGNALED(status))
            return fail("runc exec killed by signal %d", WTERMSIG(status));
        return fail("runc exec exited with status %d", WEXITSTATUS(status));
    }
    stdio_to_devnull();

    long pid, ppid;
    unsigned long long start;
    if (read_pid(val[O_PIDFILE], &pid) || proc_stat(pid, &ppid, &start))
        return fail("cannot read the exec'd process from %s: %s", val[O_PIDFILE], strerror(errno));
    if (ppid != getpid())
        return fail("exec'd process %ld is not the wrapper's child (ppid %ld)", pid, ppid);
    sync_send("pid %ld %llu", pid, start);

    long long at;
    int exit_status = wait_exit((pid_t)pid, &at);
    if (exit_status < 0)
        return EXIT_LOST;
    int code = write_status_file(val[O_STATUS], exit_status, at) == 0 ? EXIT_OK : EXIT_LOST;
    while (waitpid((pid_t)pid, NULL, 0) < 0 && errno == EINTR)
        ;
    sync_send("exit %d %lld", exit_status, at);
    return code;
}

int main(int argc, char **argv) {
    int rc = parse_args(argc, argv);
    if (rc)
        return rc;
    int flags = fcntl(sync_fd, F_GETFD);
    if (flags < 0 || fcntl(sync_fd, F_SETFD, flags | FD_CLOEXEC) < 0)
        return usage("[Errno %d] %s", errno, strerror(errno));
    return run();
}
