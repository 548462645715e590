// embedshim-keeper: the parent of the embedshim daemon.  It holds containerd's connections
// (and fds the daemon asks it to keep), so that a crash of the daemon is a short pause:
// it restarts the daemon and hands everything to the new one.  See README.md, "Architecture".
//
//   embedshim-keeper -socket PATH -log FILE -pidfile PATH -- /abs/daemon args... keeper
//
// Protocol on the control channel (SOCK_SEQPACKET, one ASCII message per packet, some with
// one fd): daemon -> keeper "A" (attach), "K <name>"+fd (keep), "D <name>" (drop);
// keeper -> daemon "L"+fd (listening socket), "F <name>"+fd, "C <id>"+fd, "E <generation>
// <crashes>" (end of the attach answer), later "C <id>"+fd for new connections and
// "Z <pid> <wait status>" for reaped orphans.
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_MSG 4096          // longest control message
#define MAX_NAME 200          // longest stored fd name
#define MAX_STORED 4096       // most stored fds
#define MAX_QUEUED_Z 1024     // Z messages are dropped past this many queued messages
#define LOOP_CRASHES 5        // this many crashes ...
#define LOOP_WINDOW_MS 10000  // ... within this window: give up
#define BACKOFF_MS 100        // restart delay after the 2nd crash in the window, doubling
#define BACKOFF_MAX_MS 1000
#define KEEPER_FD_ENV "EMBEDSHIM_KEEPER_FD"

// epoll tags; kept connections use their id (1, 2, 3, ...)
#define TAG_LISTEN UINT64_MAX
#define TAG_CONTROL (UINT64_MAX - 1)
#define TAG_SIGNAL (UINT64_MAX - 2)

struct conn {
    uint64_t id;
    int fd;
};
struct stored {
    char *name;
    int fd;
};
struct msg {  // a message the daemon's socket had no room for yet
    struct msg *next;
    int fd;  // our own duplicate, or -1
    size_t len;
    char text[];
};

static const char *sock_path, *log_path, *pid_path;
static char **first_argv, **again_argv;  // the daemon's command lines
static int ready_fd = -1;
static struct rlimit nofile;  // as inherited; restored for the daemon
static pid_t self;
static int epfd, lfd, sfd, ctl = -1;  // ctl: our end of the control channel, -1 if none
static dev_t listen_dev;
static ino_t listen_ino;
static pid_t daemon_pid;            // 0 when none runs
static bool attached;               // the daemon sent "A" and its channel is open
static bool has_attached;           // the running daemon sent "A" (it may have closed since)
static bool stopping;               // SIGTERM/SIGINT was forwarded to the daemon
static unsigned generation, crashes;  // daemons started; abnormal exits
static int64_t recent[LOOP_CRASHES];  // monotonic ms of the latest crashes
static unsigned nrecent;
static int64_t restart_at = -1, listen_retry_at = -1;  // monotonic ms, -1: none
static struct conn *conns;  // ascending ids
static size_t nconns, conns_cap;
static uint64_t next_id = 1;
static struct stored *stored;
static size_t nstored, stored_cap;
static struct msg *qhead, **qtail = &qhead;
static size_t qlen;

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// ---- logging: the daemon's format (shim/util/log.py), one open/append/close per line, so the
// daemon may rotate the file.

struct line {
    size_t n;
    char buf[2048];
};

static void put(struct line *l, const char *s, size_t len) {
    size_t room = sizeof l->buf - 1 - l->n;  // one byte kept for the newline
    if (len > room) len = room;
    memcpy(l->buf + l->n, s, len);
    l->n += len;
}

static void put_str(struct line *l, const char *s) { put(l, s, strlen(s)); }

static void put_value(struct line *l, const char *v) {
    if (*v && !strpbrk(v, " =\"\n")) {
        put_str(l, v);
        return;
    }
    put_str(l, "\"");
    for (; *v; v++) {
        if (*v == '\\' || *v == '"') put_str(l, "\\");
        if (*v == '\n') put_str(l, "\\n");
        else put(l, v, 1);
    }
    put_str(l, "\"");
}

// klog(level, msg, key, value, key, value, ..., NULL): values are strings (see num()).
static void klog(const char *level, const char *msg, ...) {
    struct line l;
    char part[64];
    struct timespec ts;
    struct tm tm;
    l.n = 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(part, sizeof part, "time=%Y-%m-%dT%H:%M:%S", &tm);
    put_str(&l, part);
    snprintf(part, sizeof part, ".%03dZ level=", (int)(ts.tv_nsec / 1000000));
    put_str(&l, part);
    put_str(&l, level);
    put_str(&l, " msg=");
    put_value(&l, msg);
    snprintf(part, sizeof part, " component=keeper pid=%d", (int)self);
    put_str(&l, part);
    va_list ap;
    va_start(ap, msg);
    for (const char *key; (key = va_arg(ap, const char *));) {
        put_str(&l, " ");
        put_str(&l, key);
        put_str(&l, "=");
        put_value(&l, va_arg(ap, const char *));
    }
    va_end(ap);
    l.buf[l.n++] = '\n';
    int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        if (write(fd, l.buf, l.n) < 0) {}  // nowhere to report it
        close(fd);
    }
}

static const char *num(char *buf, long long v) {  // buf: at least 24 bytes
    snprintf(buf, 24, "%lld", v);
    return buf;
}

// ---- leaving

static void finish(int code, const char *why) {
    // Our exit closes every kept connection (containerd sees them close) and the listening
    // socket.  Remove the socket and pidfile only if they are still ours: a newer keeper
    // may own the paths by now.
    struct stat st;
    if (stat(sock_path, &st) == 0 && st.st_dev == listen_dev && st.st_ino == listen_ino)
        unlink(sock_path);
    char buf[32] = "", mine[32];
    int fd = open(pid_path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t r = read(fd, buf, sizeof buf - 1);
        buf[r > 0 ? r : 0] = 0;
        close(fd);
    }
    snprintf(mine, sizeof mine, "%d\n", (int)self);
    if (!strcmp(buf, mine)) unlink(pid_path);
    char c[24], k[24];
    klog(code ? "error" : "info", "keeper exiting", "reason", why, "exit_code", num(c, code),
         "connections", num(k, (long long)nconns), NULL);
    exit(code);
}

static void die(const char *what) {  // a setup step failed
    fprintf(stderr, "embedshim-keeper: %s: %s\n", what, strerror(errno));
    klog("error", "keeper failed", "step", what, "error", strerror(errno), NULL);
    exit(1);
}

static void epoll_set(int op, int fd, uint32_t events, uint64_t tag) {
    struct epoll_event ev = {.events = events, .data.u64 = tag};
    if (epoll_ctl(epfd, op, fd, &ev) < 0 && op != EPOLL_CTL_DEL) die("epoll_ctl");
}

// ---- sending to the daemon

static void free_msg(struct msg *m) {
    if (m->fd >= 0) close(m->fd);
    free(m);
}

static void clear_queue(void) {
    for (struct msg *m = qhead, *next; m; m = next) {
        next = m->next;
        free_msg(m);
    }
    qhead = NULL, qtail = &qhead, qlen = 0;
}

// The daemon is gone (or closed its end): drop the channel.  SIGCHLD tells the rest.
static void detach(void) {
    if (ctl >= 0) {
        epoll_set(EPOLL_CTL_DEL, ctl, 0, 0);  // explicit: a forked child may share it briefly
        close(ctl);
    }
    ctl = -1;
    attached = false;
    clear_queue();
}

// 0: sent; 1: no room now; -1: dropped (the daemon is gone, or the kernel refused it).
static int send_now(const char *text, size_t len, int fd) {
    struct iovec iov = {.iov_base = (void *)text, .iov_len = len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } c;
    if (fd >= 0) {
        mh.msg_control = c.buf;
        mh.msg_controllen = sizeof c.buf;
        struct cmsghdr *h = CMSG_FIRSTHDR(&mh);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(h), &fd, sizeof fd);
    }
    if (sendmsg(ctl, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) return 0;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
    if (errno == EPIPE || errno == ECONNRESET || errno == ECONNREFUSED || errno == ENOTCONN) {
        detach();
    } else {
        char t[8];
        snprintf(t, sizeof t, "%.4s", text);
        klog("error", "cannot send to daemon", "message", t, "error", strerror(errno), NULL);
    }
    return -1;
}

// Send the queued messages in order, as far as the daemon's socket takes them.
static void flush(void) {
    while (qhead && ctl >= 0) {
        struct msg *m = qhead;
        if (send_now(m->text, m->len, m->fd) == 1) return;  // EPOLLOUT brings us back
        if (!qhead) return;  // detached meanwhile
        qhead = m->next, qlen--;
        if (!qhead) qtail = &qhead;
        free_msg(m);
    }
    if (ctl >= 0) epoll_set(EPOLL_CTL_MOD, ctl, EPOLLIN | EPOLLRDHUP, TAG_CONTROL);
}

// Send one message (with fd, or -1) to the attached daemon; never blocks.  What does not fit
// now waits in order in the queue, with its own duplicate of the fd, until EPOLLOUT.
static void send_msg(int fd, const char *fmt, ...) {
    if (!attached) return;
    char text[MAX_NAME + 32];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (!qhead) {
        if (send_now(text, len, fd) != 1) return;
    } else if (text[0] == 'Z' && qlen >= MAX_QUEUED_Z) {
        return;  // best effort: the daemon has the pinned exit map
    }
    struct msg *m = malloc(sizeof *m + len + 1);
    if (!m) return;
    m->next = NULL, m->len = len, m->fd = -1;
    memcpy(m->text, text, len + 1);
    if (fd >= 0 && (m->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3)) < 0) {
        klog("error", "cannot queue message", "error", strerror(errno), NULL);
        free(m);
        return;
    }
    if (!qhead) epoll_set(EPOLL_CTL_MOD, ctl, EPOLLIN | EPOLLRDHUP | EPOLLOUT, TAG_CONTROL);
    *qtail = m, qtail = &m->next, qlen++;
}

// ---- kept connections and stored fds

static struct conn *find_conn(uint64_t id) {
    size_t lo = 0, hi = nconns;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (conns[mid].id == id) return &conns[mid];
        if (conns[mid].id < id) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

static void drop_conn(struct conn *c) {
    epoll_set(EPOLL_CTL_DEL, c->fd, 0, 0);  // the daemon's duplicate would keep it registered
    close(c->fd);
    memmove(c, c + 1, (conns + nconns - c - 1) * sizeof *c);
    nconns--;
}

static void on_listen(void) {
    for (;;) {
        if (nconns == conns_cap) {
            size_t cap = conns_cap ? conns_cap * 2 : 64;
            struct conn *p = realloc(conns, cap * sizeof *p);
            if (!p) break;  // retried below like EMFILE
            conns = p, conns_cap = cap;
        }
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            break;
        }
        uint64_t id = next_id++;
        conns[nconns++] = (struct conn){.id = id, .fd = fd};
        // EPOLLRDHUP only: the daemon reads containerd's bytes, we only watch for the close.
        epoll_set(EPOLL_CTL_ADD, fd, EPOLLRDHUP, id);
        send_msg(fd, "C %" PRIu64, id);
    }
    // Out of fds or memory: leave the connections in the backlog and try again in a second
    // (a level-triggered listening socket would otherwise wake us at once, again and again).
    klog("error", "cannot accept", "error", strerror(errno), NULL);
    epoll_set(EPOLL_CTL_DEL, lfd, 0, 0);
    listen_retry_at = now_ms() + 1000;
}

static bool valid_name(const char *name) {
    size_t len = strlen(name);
    if (len == 0 || len > MAX_NAME) return false;
    for (; *name; name++)
        if ((unsigned char)*name <= ' ' || *name == 0x7f) return false;
    return true;
}

static struct stored *find_stored(const char *name) {
    for (size_t i = 0; i < nstored; i++)
        if (!strcmp(stored[i].name, name)) return &stored[i];
    return NULL;
}

static bool store(const char *name, int fd) {  // takes fd on success
    struct stored *s = find_stored(name);
    if (s) {
        close(s->fd);
        s->fd = fd;
        return true;
    }
    if (nstored == MAX_STORED) return false;
    if (nstored == stored_cap) {
        size_t cap = stored_cap ? stored_cap * 2 : 16;
        struct stored *p = realloc(stored, cap * sizeof *p);
        if (!p) return false;
        stored = p, stored_cap = cap;
    }
    char *copy = strdup(name);
    if (!copy) return false;
    stored[nstored++] = (struct stored){.name = copy, .fd = fd};
    return true;
}

static void unstore(const char *name) {
    struct stored *s = find_stored(name);
    if (!s) return;
    close(s->fd);
    free(s->name);
    *s = stored[--nstored];
}

// ---- the control channel

// "A": hand everything over, then "E".  Unsent messages of an earlier attach (before the
// daemon re-executed itself) are superseded by this answer (Z too: best effort).
static void answer_attach(void) {
    clear_queue();
    attached = has_attached = true;
    send_msg(lfd, "L");
    for (size_t i = 0; i < nstored; i++) send_msg(stored[i].fd, "F %s", stored[i].name);
    for (size_t i = 0; i < nconns; i++) send_msg(conns[i].fd, "C %" PRIu64, conns[i].id);
    send_msg(-1, "E %u %u", generation, crashes);
    char p[24], g[24], c[24], s[24];
    klog("info", "daemon attached", "daemon_pid", num(p, daemon_pid), "generation",
         num(g, generation), "connections", num(c, (long long)nconns), "stored",
         num(s, (long long)nstored), NULL);
}

static void handle(char *text, int *fds, int nfds) {
    int fd = nfds == 1 ? fds[0] : -1;
    const char *arg = text[0] && text[1] == ' ' ? text + 2 : NULL;
    if (!strcmp(text, "A") && nfds == 0) {
        answer_attach();
    } else if (text[0] == 'K' && arg && valid_name(arg) && fd >= 0) {
        if (store(arg, fd)) fds[0] = -1;
        else klog("warning", "cannot store fd", "name", arg, NULL);
    } else if (text[0] == 'D' && arg && valid_name(arg) && nfds == 0) {
        unstore(arg);
    } else {
        char n[24];
        text[64] = 0;  // enough to recognise it
        klog("warning", "bad message from daemon", "message", text, "fds", num(n, nfds), NULL);
    }
}

static void on_control(uint32_t events) {
    for (int i = 0; i < 64 && ctl >= 0; i++) {  // then let the others have a turn
        char text[MAX_MSG + 1];
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(8 * sizeof(int))];
        } c;
        struct iovec iov = {.iov_base = text, .iov_len = MAX_MSG};
        struct msghdr mh = {
            .msg_iov = &iov, .msg_iovlen = 1, .msg_control = c.buf, .msg_controllen = sizeof c.buf};
        ssize_t len = recvmsg(ctl, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (len < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) break;
        if (len <= 0) {  // closed (the protocol has no empty message): SIGCHLD follows
            detach();
            return;
        }
        int fds[8], nfds = 0;
        for (struct cmsghdr *h = CMSG_FIRSTHDR(&mh); h; h = CMSG_NXTHDR(&mh, h)) {
            if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
            int n = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (int j = 0; j < n && nfds < 8; j++)
                memcpy(&fds[nfds++], CMSG_DATA(h) + j * sizeof(int), sizeof(int));
        }
        text[len] = 0;
        if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC) || strlen(text) != (size_t)len) text[0] = '?';
        handle(text, fds, nfds);
        for (int j = 0; j < nfds; j++)
            if (fds[j] >= 0) close(fds[j]);
    }
    if (ctl >= 0 && (events & EPOLLOUT)) flush();
}

// ---- the daemon

static pid_t spawn(char **argv) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return -1;
    // The environment, prepared here: between fork and exec only async-signal-safe calls.
    extern char **environ;
    size_t n = 0;
    while (environ[n]) n++;
    char var[48], **env = malloc((n + 2) * sizeof *env);
    if (!env) {
        close(sv[0]), close(sv[1]);
        return -1;
    }
    snprintf(var, sizeof var, KEEPER_FD_ENV "=%d", sv[1]);
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], KEEPER_FD_ENV "=", sizeof KEEPER_FD_ENV)) env[m++] = environ[i];
    env[m++] = var;
    env[m] = NULL;
    pid_t pid = fork();
    if (pid == 0) {
        struct sigaction dfl = {.sa_handler = SIG_DFL};
        for (int s = 1; s < NSIG; s++) sigaction(s, &dfl, NULL);  // SIGPIPE was ignored
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setrlimit(RLIMIT_NOFILE, &nofile);
        fcntl(sv[1], F_SETFD, 0);  // the daemon's end, inherited (the rest is close-on-exec)
        execve(argv[0], argv, env);
        _exit(127);
    }
    int err = errno;
    free(env);
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        errno = err;
        return -1;
    }
    ctl = sv[0];
    epoll_set(EPOLL_CTL_ADD, ctl, EPOLLIN | EPOLLRDHUP, TAG_CONTROL);
    daemon_pid = pid;
    has_attached = false;
    generation++;
    return pid;
}

// Count a crash; give up on a crash loop, else schedule the restart.
static void crashed(void) {
    int64_t now = now_ms();
    unsigned n = 0;
    for (unsigned i = 0; i < nrecent; i++)  // sliding window
        if (now - recent[i] < LOOP_WINDOW_MS) recent[n++] = recent[i];
    if (n == LOOP_CRASHES) memmove(recent, recent + 1, --n * sizeof *recent);
    recent[n++] = now;
    nrecent = n;
    char c[24], w[24], d[24];
    if (n >= LOOP_CRASHES) {
        klog("error", "daemon crash loop; giving up", "crashes", num(c, crashes),
             "window_crashes", num(w, n), "window_s", num(d, LOOP_WINDOW_MS / 1000), NULL);
        finish(1, "crash loop");
    }
    int64_t delay = n == 1 ? 0 : (int64_t)BACKOFF_MS << (n - 2);
    restart_at = now + (delay < BACKOFF_MAX_MS ? delay : BACKOFF_MAX_MS);
}

static void daemon_exited(int status) {
    bool was_attached = has_attached;
    char p[24], v[24], c[24];
    num(p, daemon_pid);
    daemon_pid = 0;
    detach();
    bool sig = WIFSIGNALED(status);
    int code = sig ? WTERMSIG(status) : WEXITSTATUS(status);
    if (!sig && code == 0) {
        klog("info", "daemon exited", "daemon_pid", p, "exit_code", "0", NULL);
        finish(0, "daemon exited");
    }
    if (stopping && sig && (code == SIGTERM || code == SIGINT)) {  // the signal we forwarded
        klog("info", "daemon stopped", "daemon_pid", p, "signal", num(v, code), NULL);
        finish(0, "daemon stopped");
    }
    crashes++;
    klog("error", "daemon died", "daemon_pid", p, sig ? "signal" : "exit_code", num(v, code),
         "crashes", num(c, crashes), NULL);
    if (!was_attached && generation == 1) {
        klog("error", "daemon failed to start", "daemon_pid", p, NULL);
        finish(1, "daemon failed to start");
    }
    crashed();
}

static void restart(void) {
    restart_at = -1;
    char p[24], g[24], c[24];
    if (spawn(again_argv) < 0) {
        klog("error", "cannot start daemon", "error", strerror(errno), NULL);
        crashes++;
        crashed();
        return;
    }
    klog("info", "daemon restarted", "daemon_pid", num(p, daemon_pid), "generation",
         num(g, generation), "crashes", num(c, crashes), NULL);
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == daemon_pid) daemon_exited(status);
        else send_msg(-1, "Z %d %d", (int)pid, status);  // an orphan of a dead daemon
    }
}

static void on_signal(void) {
    struct signalfd_siginfo si;
    while (read(sfd, &si, sizeof si) == sizeof si) {
        int sig = si.ssi_signo;
        if (sig == SIGCHLD) {
            reap();
        } else if (daemon_pid > 0) {
            if (sig != SIGHUP) stopping = true;
            kill(daemon_pid, sig);
            char d[24], v[24];
            klog("info", "signal forwarded to daemon", "daemon_pid", num(d, daemon_pid), "signal",
                 num(v, sig), NULL);
        } else if (sig != SIGHUP) {
            finish(0, "stopped while no daemon ran");
        }
    }
}

// ---- setup

static void usage(const char *why) {
    fprintf(stderr,
            "embedshim-keeper: %s\nusage: embedshim-keeper -socket PATH -log FILE -pidfile PATH"
            " -- /path/to/daemon [args...] keeper\n",
            why);
    exit(2);
}

static void parse(int argc, char **argv) {
    int i = 1;
    for (; i < argc && strcmp(argv[i], "--"); i += 2) {
        const char **dst = !strcmp(argv[i], "-socket")    ? &sock_path
                           : !strcmp(argv[i], "-log")     ? &log_path
                           : !strcmp(argv[i], "-pidfile") ? &pid_path
                                                          : NULL;
        if (!dst) usage("unknown option");
        if (i + 1 >= argc) usage("missing value");
        *dst = argv[i + 1];
    }
    if (!sock_path || !log_path || !pid_path) usage("-socket, -log and -pidfile are required");
    char **tail = argv + i + 1;
    int n = argc - i - 1;
    if (i >= argc || n < 2 || tail[0][0] != '/' || strcmp(tail[n - 1], "keeper"))
        usage("expected -- /absolute/daemon [args...] keeper");
    first_argv = calloc(n + 1, sizeof *first_argv);
    again_argv = calloc(n + 1, sizeof *again_argv);
    if (!first_argv || !again_argv) usage("out of memory");
    for (int j = 0, m = 0; j < n; j++) {
        first_argv[j] = j == n - 1 ? "daemon" : tail[j];
        if (!strcmp(tail[j], "-ready-fd")) {  // for the first daemon only
            if (j + 1 >= n - 1) usage("missing value for -ready-fd");
            char *end;
            long fd = strtol(tail[j + 1], &end, 10);
            if (*end || end == tail[j + 1] || fd < 0 || fd > INT32_MAX) usage("bad -ready-fd");
            ready_fd = fd;
            first_argv[j + 1] = tail[j + 1];
            j++;
            continue;
        }
        again_argv[m++] = first_argv[j];
    }
}

// A path that still means the same file after chdir("/").
static const char *absolute(const char *path) {
    if (path[0] == '/') return path;
    char *cwd = getcwd(NULL, 0), *abs;
    if (!cwd || asprintf(&abs, "%s/%s", cwd, path) < 0) usage("cannot make the paths absolute");
    free(cwd);
    return abs;
}

static void listen_socket(void) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(sock_path) >= sizeof sa.sun_path) {
        errno = ENAMETOOLONG;
        die(sock_path);
    }
    strcpy(sa.sun_path, sock_path);
    if (unlink(sock_path) < 0 && errno != ENOENT) die("unlink socket");  // stale: we hold the lock
    lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (lfd < 0) die("socket");
    mode_t old = umask(0177);  // never more than 0600, not even for a moment
    int r = bind(lfd, (struct sockaddr *)&sa, sizeof sa);
    umask(old);
    if (r < 0) die("bind");
    struct stat st;
    if (chmod(sock_path, 0600) < 0 || listen(lfd, 1024) < 0 || stat(sock_path, &st) < 0)
        die("listen");
    listen_dev = st.st_dev, listen_ino = st.st_ino;
}

int main(int argc, char **argv) {
    parse(argc, argv);
    self = getpid();
    // Not the caller's directory (containerd runs `start` in a bundle): the daemon's is its own.
    sock_path = absolute(sock_path), log_path = absolute(log_path), pid_path = absolute(pid_path);
    if (chdir("/") < 0) die("chdir");
    // Containers the daemon started become ours if it dies, so we reap them.
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0) die("prctl");
    signal(SIGPIPE, SIG_IGN);
    // The connections and stored fds are ours as well as the daemon's: allow as many.
    getrlimit(RLIMIT_NOFILE, &nofile);
    struct rlimit raised = {nofile.rlim_max, nofile.rlim_max};
    setrlimit(RLIMIT_NOFILE, &raised);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD), sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT), sigaddset(&mask, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) die("sigprocmask");
    if ((sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) die("signalfd");
    if ((epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) die("epoll_create1");
    listen_socket();
    FILE *f = fopen(pid_path, "we");
    if (!f || fprintf(f, "%d\n", (int)self) < 0 || fclose(f)) die("pidfile");
    epoll_set(EPOLL_CTL_ADD, lfd, EPOLLIN, TAG_LISTEN);
    epoll_set(EPOLL_CTL_ADD, sfd, EPOLLIN, TAG_SIGNAL);
    if (spawn(first_argv) < 0) die("start daemon");
    if (ready_fd >= 0) close(ready_fd);  // the daemon's now: its death closes it for good
    char p[24];
    klog("info", "keeper started", "socket", sock_path, "daemon_pid", num(p, daemon_pid), NULL);

    for (;;) {
        int timeout = -1;
        int64_t now = now_ms();
        int64_t next = restart_at;
        if (listen_retry_at >= 0 && (next < 0 || listen_retry_at < next)) next = listen_retry_at;
        if (next >= 0) timeout = next > now ? (int)(next - now) : 0;
        struct epoll_event ev[64];
        int n = epoll_wait(epfd, ev, 64, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            uint64_t tag = ev[i].data.u64;
            if (tag == TAG_LISTEN) on_listen();
            else if (tag == TAG_SIGNAL) on_signal();
            else if (tag == TAG_CONTROL) {
                if (ctl >= 0) on_control(ev[i].events);
            } else {
                struct conn *c = find_conn(tag);  // gone already if closed earlier in the batch
                if (c) drop_conn(c);
            }
        }
        now = now_ms();
        if (listen_retry_at >= 0 && now >= listen_retry_at) {
            listen_retry_at = -1;
            epoll_set(EPOLL_CTL_ADD, lfd, EPOLLIN, TAG_LISTEN);
        }
        if (restart_at >= 0 && now >= restart_at) restart();
    }
}
