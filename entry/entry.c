/* embedshim-entry: installed as containerd-shim-embed-v1 (python -m shim.cmd.launcher).
 *
 * containerd runs `containerd-shim-embed-v1 start` before every task and `... delete` after
 * every task deletion.  In the usual cases neither needs Python, whose start-up is most of
 * their cost, so this answers them itself, exactly as shim/cmd/start.py and shim/cmd/delete.py would:
 *
 *   start   the daemon answers Reserve: under the same lock file, the same reservation, the
 *           bundle's address file, the daemon's address on stdout, exit 0;
 *   delete  the daemon answers Cleanup: its DeleteResponse on stdout; or NotFound (it has
 *           deleted the task already) and nothing of the task is left on the host: an empty
 *           DeleteResponse stamped now, exit 0.
 *
 * Anything else (no daemon, any flag or command it does not know, any error, any doubt)
 * executes the Python entry point beside it, <prefix>/libexec/embedshim/containerd-shim-
 * embed-v1 for <prefix>/bin/containerd-shim-embed-v1, with the same arguments: it then does
 * the whole job, messages and exit codes included.  Only a daemon that was reached and did
 * not answer properly is not asked again: EMBEDSHIM_DAEMON_SILENT=1 tells Python so (start
 * then spawns a daemon at once, delete cleans up offline), so a hung daemon costs one
 * timeout, as it did before. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "sha256.h"

#define PY_ENTRY "/libexec/embedshim/containerd-shim-embed-v1"
#define SILENT_ENV "EMBEDSHIM_DAEMON_SILENT"
#define DEFAULT_ROOT "/run/embedshim"
#define SERVICE "embedshim.v1.Daemon"
#define MAX_MESSAGE (4u << 20)
#define MAX_ID 76
#define CODE_NOT_FOUND 5
#define EXIT_UNFLUSHED 120 /* Python's exit code when it cannot flush stdout */

static char **g_argv;

/* Python does the job: exec the entry point beside us with our own arguments. */
__attribute__((noreturn)) static void python(int silent) {
    static char path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", path, sizeof path - sizeof PY_ENTRY);
    if (n > 0) {
        path[n] = 0;
        for (int up = 0; up < 2; up++) { /* <prefix>/bin/x -> <prefix> */
            char *slash = strrchr(path, '/');
            if (slash != NULL)
                *slash = 0;
        }
        strcat(path, PY_ENTRY);
        if (silent)
            setenv(SILENT_ENV, "1", 1);
        execv(path, g_argv);
    }
    fprintf(stderr, "containerd-shim-embed-v1: cannot run the Python entry point %s: %s\n", path,
            strerror(errno));
    _exit(1);
}

/* -- the command line: Go flag syntax, as shim/cmd/cli.py parses it ---------------------------- */

struct flags {
    const char *namespace, *address, *id, *bundle, *command;
};

static const char *const VALUE_FLAGS[] = {"namespace",     "address",      "publish-binary",
                                          "id",            "bundle",       "socket",
                                          "ttrpc-address", "ready-fd",     "containerd-state",
                                          NULL};

/* The usual flags and a start/delete command; anything else (-v, -info, -h, a boolean
 * with =value, an unknown flag, another command) goes to Python. */
static void parse(int argc, char **argv, struct flags *f) {
    int i = 1;
    memset(f, 0, sizeof *f);
    f->namespace = f->address = f->id = f->bundle = "";
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0 || arg[0] != '-' || strcmp(arg, "-") == 0)
            break;
        const char *name = arg;
        while (*name == '-')
            name++;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        if (len == 5 && strncmp(name, "debug", 5) == 0 && !eq)
            continue; /* only used when spawning a daemon, which Python does */
        int known = 0;
        for (const char *const *v = VALUE_FLAGS; *v; v++) {
            if (strlen(*v) != len || strncmp(*v, name, len) != 0)
                continue;
            const char *value;
            if (eq)
                value = eq + 1;
            else if (i + 1 < argc)
                value = argv[++i];
            else
                python(0);
            if (strcmp(*v, "namespace") == 0)
                f->namespace = value;
            else if (strcmp(*v, "address") == 0)
                f->address = value;
            else if (strcmp(*v, "id") == 0)
                f->id = value;
            else if (strcmp(*v, "bundle") == 0)
                f->bundle = value;
            known = 1;
            break;
        }
        if (!known)
            python(0);
    }
    if (i < argc && strcmp(argv[i], "--") == 0)
        i++;
    if (i >= argc || (strcmp(argv[i], "start") != 0 && strcmp(argv[i], "delete") != 0))
        python(0);
    f->command = argv[i];
}

/* shim/util/identifiers.py: runs of [A-Za-z0-9] joined by single '.', '_' or '-', at most 76. */
static int valid_id(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > MAX_ID)
        return 0;
    int after_sep = 1;
    for (; *s; s++) {
        char c = *s;
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
            after_sep = 0;
        else if ((c == '.' || c == '_' || c == '-') && !after_sep)
            after_sep = 1;
        else
            return 0;
    }
    return !after_sep;
}

static int printable(const char *s) {
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e)
            return 0;
    return 1;
}

/* -- paths: shim/util/paths.py and shim/util/fsutil.py ---------------------------------------------- */

/* fsutil.join of two components, into a static-sized buffer; NULL if it does not fit. */
static char *join(char *out, size_t size, const char *head, const char *tail) {
    int n;
    if (tail[0] == '/' || head[0] == 0)
        n = snprintf(out, size, "%s", tail);
    else if (head[strlen(head) - 1] == '/')
        n = snprintf(out, size, "%s%s", head, tail);
    else
        n = snprintf(out, size, "%s/%s", head, tail);
    return n < 0 || (size_t)n >= size ? NULL : out;
}

/* DaemonPaths.for_containerd(address).dir: $EMBEDSHIM_ROOT (default /run/embedshim) and the
 * first 16 hex digits of sha256(address).  A root Python would normalise goes to Python. */
static void daemon_dir(char *out, size_t size, const char *address) {
    const char *root = getenv("EMBEDSHIM_ROOT");
    if (root == NULL || root[0] == 0)
        root = DEFAULT_ROOT;
    size_t n = strlen(root);
    if (root[0] != '/' || strstr(root, "//") || strstr(root, "/.") || root[n - 1] == '/' ||
        !printable(root))
        python(0);
    uint8_t digest[32];
    sha256(address, strlen(address), digest);
    char key[17];
    for (int i = 0; i < 8; i++)
        snprintf(key + 2 * i, 3, "%02x", digest[i]);
    if (!join(out, size, root, key))
        python(0);
}

/* -- one ttrpc call (shim/ttrpc/codec.py's wire format) ------------------------------------ */

enum { CALL_OK = 0, NO_DAEMON = -1, NO_ANSWER = -2 };

struct buf {
    uint8_t *p;
    size_t len, cap;
};

static void put(struct buf *b, const void *data, size_t len) {
    if (b->len + len > b->cap) {
        b->cap = (b->len + len) * 2;
        b->p = realloc(b->p, b->cap);
        if (b->p == NULL)
            python(0);
    }
    memcpy(b->p + b->len, data, len);
    b->len += len;
}

static void put_varint(struct buf *b, uint64_t v) {
    uint8_t tmp[10];
    size_t n = 0;
    while (v > 0x7f) {
        tmp[n++] = (uint8_t)(v & 0x7f) | 0x80;
        v >>= 7;
    }
    tmp[n++] = (uint8_t)v;
    put(b, tmp, n);
}

static void put_bytes(struct buf *b, unsigned field, const void *data, size_t len) {
    if (len == 0)
        return;
    put_varint(b, field << 3 | 2);
    put_varint(b, len);
    put(b, data, len);
}

static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    *v = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) {
        if (*p >= end)
            return -1;
        uint8_t byte = *(*p)++;
        *v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80))
            return 0;
    }
    return -1;
}

/* The next field of a protobuf message: number, and a varint value or a byte range. */
static int next_field(const uint8_t **p, const uint8_t *end, unsigned *number, uint64_t *value,
                      const uint8_t **data, size_t *len) {
    uint64_t key;
    if (read_varint(p, end, &key) < 0)
        return -1;
    *number = (unsigned)(key >> 3);
    *data = NULL;
    *len = 0;
    switch (key & 7) {
    case 0:
        return read_varint(p, end, value);
    case 2:
        if (read_varint(p, end, value) < 0 || *value > (uint64_t)(end - *p))
            return -1;
        *data = *p;
        *len = (size_t)*value;
        *p += *len;
        return 0;
    case 1:
    case 5: {
        size_t n = (key & 7) == 1 ? 8 : 4;
        if ((size_t)(end - *p) < n)
            return -1;
        *p += n;
        return 0;
    }
    default:
        return -1;
    }
}

static int read_full(int fd, uint8_t *p, size_t len) {
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* A broken pipe is an error to report, not a signal to die of (Python ignores SIGPIPE):
 * send with MSG_NOSIGNAL to the daemon, and ignore the signal before writing our output. */
static int write_full(int fd, const uint8_t *p, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == ENOTSOCK)
            n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* embedshim.v1.Daemon/<method>(namespace\0id) on <dir>/daemon.sock, as BlockingClient does
 * it (stream 1, no deadline, `timeout` seconds for each socket operation).  CALL_OK with the
 * status code and the payload; NO_DAEMON when nothing could be asked; NO_ANSWER when the
 * daemon was reached but gave no well-formed response. */
static int call(const char *dir, const char *method, const struct flags *f, int timeout,
                uint64_t *code, struct buf *out) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (!join(sa.sun_path, sizeof sa.sun_path, dir, "daemon.sock"))
        return NO_DAEMON; /* Python: "AF_UNIX path too long", i.e. no daemon */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NO_DAEMON;
    struct timeval tv = {.tv_sec = timeout};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int timed_out = errno == EAGAIN || errno == EINPROGRESS;
        close(fd);
        return timed_out ? NO_ANSWER : NO_DAEMON;
    }
    struct buf payload = {0}, request = {0}, frame = {0};
    put(&payload, f->namespace, strlen(f->namespace));
    put(&payload, "", 1);
    put(&payload, f->id, strlen(f->id));
    put_bytes(&request, 1, SERVICE, strlen(SERVICE));
    put_bytes(&request, 2, method, strlen(method));
    put_bytes(&request, 3, payload.p, payload.len);
    uint8_t header[10] = {(uint8_t)(request.len >> 24), (uint8_t)(request.len >> 16),
                          (uint8_t)(request.len >> 8), (uint8_t)request.len, 0, 0, 0, 1, 1, 0};
    put(&frame, header, sizeof header);
    put(&frame, request.p, request.len);
    int result = NO_ANSWER;
    if (write_full(fd, frame.p, frame.len) < 0)
        goto done;
    for (;;) { /* frames of other streams are skipped, as FrameDecoder's caller does */
        if (read_full(fd, header, sizeof header) < 0)
            goto done;
        uint32_t len = (uint32_t)header[0] << 24 | (uint32_t)header[1] << 16 |
                       (uint32_t)header[2] << 8 | header[3];
        uint32_t stream = (uint32_t)header[4] << 24 | (uint32_t)header[5] << 16 |
                          (uint32_t)header[6] << 8 | header[7];
        if (len > MAX_MESSAGE)
            goto done;
        uint8_t *body = malloc(len ? len : 1);
        if (body == NULL || read_full(fd, body, len) < 0) {
            free(body);
            goto done;
        }
        if (stream != 1) {
            free(body);
            continue;
        }
        /* ttrpc.Response{status=1 (google.rpc.Status{code=1}), payload=2} */
        const uint8_t *p = body, *end = body + len;
        *code = 0;
        out->len = 0;
        while (p < end) {
            unsigned number;
            uint64_t value;
            const uint8_t *data;
            size_t dlen;
            if (next_field(&p, end, &number, &value, &data, &dlen) < 0) {
                free(body);
                goto done;
            }
            if (number == 1 && data != NULL) {
                const uint8_t *q = data, *qend = data + dlen;
                while (q < qend) {
                    unsigned n2;
                    uint64_t v2;
                    const uint8_t *d2;
                    size_t l2;
                    if (next_field(&q, qend, &n2, &v2, &d2, &l2) < 0) {
                        free(body);
                        goto done;
                    }
                    if (n2 == 1 && d2 == NULL)
                        *code = v2;
                }
            } else if (number == 2 && data != NULL) {
                out->len = 0;
                put(out, data, dlen);
            }
        }
        free(body);
        result = CALL_OK;
        goto done;
    }
done:
    close(fd);
    free(payload.p);
    free(request.p);
    free(frame.p);
    return result;
}

/* -- start ---------------------------------------------------------------------------------- */

/* fsutil.write_atomic(join(bundle, "address"), address, 0644). */
static int write_address(const char *bundle, const char *address) {
    char path[PATH_MAX], tmp[PATH_MAX];
    if (!join(path, sizeof path, bundle, "address"))
        return -1;
    char *slash = strrchr(path, '/');
    int n = slash ? snprintf(tmp, sizeof tmp, "%.*s/.tmp-%d-%s", (int)(slash - path), path,
                             (int)getpid(), slash + 1)
                  : snprintf(tmp, sizeof tmp, ".tmp-%d-%s", (int)getpid(), path);
    if (n < 0 || (size_t)n >= sizeof tmp)
        return -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    int ok = write_full(fd, (const uint8_t *)address, strlen(address)) == 0 &&
             fchmod(fd, 0644) == 0;
    ok = close(fd) == 0 && ok;
    if (ok && rename(tmp, path) == 0)
        return 0;
    unlink(tmp);
    return -1;
}

static int start(const struct flags *f, const char *dir, const char *bundle) {
    char lock[PATH_MAX], address[PATH_MAX];
    if (!join(lock, sizeof lock, dir, "start.lock"))
        python(0);
    if (snprintf(address, sizeof address, "unix://%s/daemon.sock", dir) >= (int)sizeof address)
        python(0);
    /* DaemonPaths.ensure(): a missing parent (or any other error) is Python's to handle */
    if ((mkdir(dir, 0700) < 0 && errno != EEXIST) || chmod(dir, 0700) < 0)
        python(0);
    int lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0)
        python(0);
    while (flock(lock_fd, LOCK_EX) < 0)
        if (errno != EINTR)
            python(0);
    uint64_t code;
    struct buf out = {0};
    int r = call(dir, "Reserve", f, 3, &code, &out);
    if (r == NO_DAEMON)
        python(0); /* the lock goes with exec (O_CLOEXEC); Python takes it again and spawns */
    if (r == NO_ANSWER || code != 0)
        python(1);
    for (size_t i = 0; i < out.len; i++) /* start.py: int(out or b"0") */
        if (out.p[i] < '0' || out.p[i] > '9')
            python(0);
    close(lock_fd);
    if (write_address(bundle, address) < 0)
        python(0); /* Python reserves again (idempotent) and reports the error */
    signal(SIGPIPE, SIG_IGN);
    return write_full(1, (const uint8_t *)address, strlen(address)) < 0 ? EXIT_UNFLUSHED : 0;
}

/* -- delete --------------------------------------------------------------------------------- */

static int mnt_id(const char *path, uint64_t *id) {
    struct statx stx;
    if (statx(AT_FDCWD, path, 0, STATX_MNT_ID, &stx) < 0)
        return -1;
    if (!(stx.stx_mask & STATX_MNT_ID)) {
        errno = ENOSYS;
        return -1;
    }
    *id = stx.stx_mnt_id;
    return 0;
}

/* delete.py's _leftovers: 1 if runc still has the container or the rootfs is mounted, 0 if
 * neither, -1 if unsure (then Python looks). */
static int leftovers(const char *dir, const struct flags *f, const char *bundle) {
    char runc[PATH_MAX], rootfs[PATH_MAX], parent[PATH_MAX];
    struct stat st;
    if (snprintf(runc, sizeof runc, "%s/runc/%s/%s", dir, f->namespace, f->id) >=
        (int)sizeof runc)
        return -1;
    if (stat(runc, &st) == 0)
        return 1;
    if (errno != ENOENT)
        return -1;
    if (!join(rootfs, sizeof rootfs, bundle, "rootfs") ||
        snprintf(parent, sizeof parent, "%s/..", rootfs) >= (int)sizeof parent)
        return -1;
    uint64_t here, above;
    if (mnt_id(rootfs, &here) < 0)
        return errno == ENOENT ? 0 : -1;
    if (mnt_id(parent, &above) < 0)
        return -1; /* not a directory, say: Python compares with its real parent */
    return here != above;
}

static int delete(const struct flags *f, const char *dir, const char *bundle) {
    uint64_t code;
    struct buf out = {0};
    int r = call(dir, "Cleanup", f, 4, &code, &out);
    if (r == NO_DAEMON)
        python(0);
    if (r == NO_ANSWER || (code != 0 && code != CODE_NOT_FOUND))
        python(1); /* Python cleans up offline without asking again */
    if (code == CODE_NOT_FOUND) {
        /* The usual case: the daemon deleted the task when containerd asked it to. */
        if (leftovers(dir, f, bundle) != 0)
            python(0); /* it asks again (NotFound changes nothing) and cleans up offline */
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        struct buf ts = {0};
        if (now.tv_sec) {
            put_varint(&ts, 1 << 3);
            put_varint(&ts, (uint64_t)now.tv_sec);
        }
        if (now.tv_nsec) {
            put_varint(&ts, 2 << 3);
            put_varint(&ts, (uint64_t)now.tv_nsec);
        }
        /* DeleteResponse{exited_at=3}: pid and exit_status are 0, so absent */
        out.len = 0;
        put_varint(&out, 3 << 3 | 2);
        put_varint(&out, ts.len);
        if (ts.len)
            put(&out, ts.p, ts.len);
    }
    signal(SIGPIPE, SIG_IGN);
    return out.len && write_full(1, out.p, out.len) < 0 ? EXIT_UNFLUSHED : 0;
}

int main(int argc, char **argv) {
    g_argv = argv;
    if (argc < 1)
        python(0);
    struct flags f;
    parse(argc, argv, &f);
    /* what start.py/delete.py would refuse, they refuse themselves, in their words */
    if (!f.address[0] || !printable(f.address) || !valid_id(f.namespace) || !valid_id(f.id))
        python(0);
    char dir[PATH_MAX], cwd[PATH_MAX];
    daemon_dir(dir, sizeof dir, f.address);
    const char *bundle = f.bundle;
    if (!bundle[0]) {
        if (getcwd(cwd, sizeof cwd) == NULL)
            python(0);
        bundle = cwd;
    }
    return strcmp(f.command, "start") == 0 ? start(&f, dir, bundle) : delete (&f, dir, bundle);
}
