/*
 * nodelay_preload.c - LD_PRELOAD shim for the CardBridge test harness.
 *
 * The vsmartcard vpcd driver (loaded into pcscd) writes every frame to the
 * card emulator with two send() calls (2-byte length, then payload).  With
 * Nagle's algorithm enabled the second write waits for the peer's delayed
 * ACK, costing ~40 ms per APDU.  This library sets TCP_NODELAY on every TCP
 * socket returned by accept()/accept4() and on TCP sockets passed to
 * connect(), which removes that delay.  Non-TCP sockets are left untouched.
 *
 * Build: cc -shared -fPIC -O2 -o nodelay_preload.so nodelay_preload.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int nodelay_enabled(void)
{
    const char *v = getenv("CBHARNESS_NODELAY");
    return !(v && strcmp(v, "0") == 0);
}

/* The held listening socket for an IPv4 port, or -1. */
static int held_fd(unsigned port)
{
    const char *p = getenv("CBHARNESS_HELD_PORTS");
    while (p && *p) {
        char *end;
        unsigned long hp = strtoul(p, &end, 10);
        if (*end != ':')
            return -1;
        long fd = strtol(end + 1, &end, 10);
        if (hp == port)
            return (int)fd;
        if (*end != ',')
            return -1;
        p = end + 1;
    }
    return -1;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static bind_fn real;
    if (!real)
        real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        int held = held_fd(ntohs(((const struct sockaddr_in *)addr)->sin_port));
        if (held >= 0) {
            if (dup2(held, fd) < 0)
                return -1;
            return 0;
        }
    }
    return real(fd, addr, len);
}

static void set_nodelay_if_tcp(int fd)
{
    int saved = errno;
    int type = 0;
    socklen_t tlen = sizeof type;
    struct sockaddr_storage ss;
    socklen_t slen = sizeof ss;

    if (fd < 0 || !nodelay_enabled())
        goto out;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_STREAM)
        goto out;
    if (getsockname(fd, (struct sockaddr *)&ss, &slen) != 0)
        goto out;
    if (ss.ss_family == AF_INET || ss.ss_family == AF_INET6) {
        int one = 1;
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
out:
    errno = saved;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    static accept_fn real;
    if (!real)
        real = (accept_fn)dlsym(RTLD_NEXT, "accept");
    int r = real(fd, addr, len);
    set_nodelay_if_tcp(r);
    return r;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static accept4_fn real;
    if (!real)
        real = (accept4_fn)dlsym(RTLD_NEXT, "accept4");
    int r = real(fd, addr, len, flags);
    set_nodelay_if_tcp(r);
    return r;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static connect_fn real;
    if (!real)
        real = (connect_fn)dlsym(RTLD_NEXT, "connect");
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6))
        set_nodelay_if_tcp(fd);
    return real(fd, addr, len);
}
