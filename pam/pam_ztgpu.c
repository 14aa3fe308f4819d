/*
 * pam_ztgpu.so: the compiled face of the ztgpu PAM module (compute nodes).
 *
 * The same decisions as the pam_python module (ztgpu/pam/session.py), for
 * the phases every SSH login pays for: account (may this user log in here?)
 * and session (put sshd's process, which the shell is forked from, into the
 * user's job). It is a thin client of ztgpu-noded: one JSON request per
 * phase over the agent's unix socket, the agent decides and records. What
 * this file decides alone is what it must decide when the agent cannot:
 * root and the break-glass accounts get in, everything else takes the named
 * action of its failure mode, whose default is deny.
 *
 * `ztgpu install --pam SERVICE` compiles it (gcc, libpam0g-dev) into the
 * hooks directory and writes the stack lines:
 *
 *   account required /usr/libexec/ztgpu/pam_ztgpu.so socket=... [options]
 *   session required /usr/libexec/ztgpu/pam_ztgpu.so socket=... [options]
 *
 * Options and messages are those of the Python module (see its docs); an
 * unknown option or a bad value refuses the login and says which word.
 *
 * Built with -DZTGPU_PAM_SELFTEST it is instead a program that reads one
 * agent answer on stdin and prints what the parser found (the tests run it
 * under AddressSanitizer against Python's own JSON reading).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#ifndef ZTGPU_PAM_SELFTEST
#define PAM_SM_ACCOUNT
#define PAM_SM_SESSION
#define PAM_SM_AUTH
#include <security/pam_ext.h>
#include <security/pam_modules.h>
#endif

#define DEFAULT_SOCKET "/run/ztgpu/noded.sock"
#define MAX_ANSWER (64 * 1024)
#define MAX_REQUEST 4096
#define MAX_TEXT 1024
#define MAX_DEPTH 32


/* ------------------------------------------------------------------ JSON */
/* A strict reader for the agent's answers: it validates the whole text
 * (RFC 8259 grammar, no NaN/Infinity, no control characters in strings,
 * bounded depth) and then looks values up by key. Nothing is allocated. */

struct span {
    const char *p;
    const char *end;
};

static const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int hex4(const char *p, const char *end, unsigned *out) {
    unsigned v = 0;
    if (end - p < 4) return -1;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0) return -1;
        v = (v << 4) | (unsigned)h;
    }
    *out = v;
    return 0;
}

/* Append one code point as UTF-8 into out[*n] (bounded by cap, NUL kept). */
static void put_utf8(char *out, size_t cap, size_t *n, unsigned cp) {
    char b[4];
    size_t k;
    if (cp == 0) cp = 0xFFFD; /* no NUL inside C strings */
    if (cp < 0x80) { b[0] = (char)cp; k = 1; }
    else if (cp < 0x800) { b[0] = (char)(0xC0 | (cp >> 6)); b[1] = (char)(0x80 | (cp & 0x3F)); k = 2; }
    else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | (cp >> 12)); b[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (char)(0x80 | (cp & 0x3F)); k = 3;
    } else {
        b[0] = (char)(0xF0 | (cp >> 18)); b[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); b[3] = (char)(0x80 | (cp & 0x3F)); k = 4;
    }
    if (out == NULL || *n + k >= cap) return; /* truncated, still valid */
    memcpy(out + *n, b, k);
    *n += k;
}

/* A string starting at p (at its quote). Decodes into out (may be NULL).
 * Returns the position after the closing quote, or NULL if invalid. */
static const char *jstring(const char *p, const char *end, char *out, size_t cap) {
    size_t n = 0;
    if (p >= end || *p != '"') return NULL;
    p++;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            if (out != NULL && cap > 0) out[n < cap ? n : cap - 1] = '\0';
            return p + 1;
        }
        if (c < 0x20 || c >= 0x80) return NULL; /* the agent writes ASCII JSON */
        if (c != '\\') {
            if (out != NULL && n + 1 < cap) out[n++] = (char)c;
            p++;
            continue;
        }
        if (++p >= end) return NULL;
        unsigned cp;
        switch (*p) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            if (hex4(p + 1, end, &cp) < 0) return NULL;
            p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && end - p >= 7 && p[1] == '\\' && p[2] == 'u') {
                unsigned lo;
                if (hex4(p + 3, end, &lo) == 0 && lo >= 0xDC00 && lo < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    p += 6;
                }
            }
            if (cp >= 0xD800 && cp < 0xE000) cp = 0xFFFD; /* a lone surrogate */
            break;
        default:
            return NULL;
        }
        put_utf8(out, cap, &n, cp);
        p++;
    }
    return NULL;
}

static const char *jnumber(const char *p, const char *end) {
    if (p < end && *p == '-') p++;
    if (p >= end) return NULL;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (p < end && *p >= '0' && *p <= '9') p++;
    else return NULL;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    return p;
}

static const char *literal(const char *p, const char *end, const char *word) {
    size_t k = strlen(word);
    if ((size_t)(end - p) < k || memcmp(p, word, k) != 0) return NULL;
    return p + k;
}

/* Skips one value at p (no leading whitespace); NULL if it is not JSON. */
static const char *jskip(const char *p, const char *end, int depth) {
    if (p >= end || depth > MAX_DEPTH) return NULL;
    switch (*p) {
    case '"': return jstring(p, end, NULL, 0);
    case 't': return literal(p, end, "true");
    case 'f': return literal(p, end, "false");
    case 'n': return literal(p, end, "null");
    case '{': case '[': {
        char close = *p == '{' ? '}' : ']';
        int object = *p == '{';
        p = ws(p + 1, end);
        if (p < end && *p == close) return p + 1;
        for (;;) {
            if (object) {
                p = jstring(p, end, NULL, 0);
                if (p == NULL) return NULL;
                p = ws(p, end);
                if (p >= end || *p != ':') return NULL;
                p = ws(p + 1, end);
            }
            p = jskip(p, end, depth + 1);
            if (p == NULL) return NULL;
            p = ws(p, end);
            if (p >= end) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p = ws(p + 1, end);
        }
    }
    default: return jnumber(p, end);
    }
}

/* The value of key in the object at obj (already validated), the last one
 * if the key repeats (as Python reads it). Returns 0 and sets *value. */
static int jget(struct span obj, const char *key, struct span *value) {
    const char *p = ws(obj.p, obj.end);
    int found = 0;
    if (p >= obj.end || *p != '{') return -1;
    p = ws(p + 1, obj.end);
    if (p < obj.end && *p == '}') return -1;
    while (p < obj.end) {
        /* A key that does not fit is cut at 255 bytes: never one looked for. */
        char name[256];
        const char *after = jstring(p, obj.end, name, sizeof name);
        if (after == NULL) return -1;
        int same = strcmp(name, key) == 0;
        p = ws(ws(after, obj.end) + 1, obj.end); /* past ':' */
        const char *next = jskip(p, obj.end, 1);
        if (next == NULL) return -1;
        if (same) {
            value->p = p;
            value->end = next;
            found = 1;
        }
        p = ws(next, obj.end);
        if (p >= obj.end || *p == '}') break;
        p = ws(p + 1, obj.end);
    }
    return found ? 0 : -1;
}

/* 1 true, 0 false, -1 absent or not a boolean. */
static int jbool(struct span obj, const char *key) {
    struct span v;
    if (jget(obj, key, &v) < 0) return -1;
    if (literal(v.p, v.end, "true") == v.end) return 1;
    if (literal(v.p, v.end, "false") == v.end) return 0;
    return -1;
}

/* The string value of key into out ("" when absent or not a string);
 * returns 0 when it is a string. */
static int jtext(struct span obj, const char *key, char *out, size_t cap) {
    struct span v;
    out[0] = '\0';
    if (jget(obj, key, &v) < 0 || *v.p != '"') return -1;
    return jstring(v.p, v.end, out, cap) == NULL ? -1 : 0;
}

/* What an answer says. */
struct answer {
    int valid;          /* well-formed JSON object with a boolean "ok" */
    int ok;
    char kind[32];      /* ok=false: busy, denied, bad_request, fault */
    char error[MAX_TEXT];
    int has_result;     /* ok=true and "result" is an object */
    int allow;          /* result.allow: 1, 0, -1 absent */
    int adopted;        /* result.adopted: 1, 0, -1 absent */
    char code[64];
    char message[MAX_TEXT];
    char job_id[32];    /* result.job_id when a string */
};

static void read_answer(const char *text, size_t len, struct answer *a) {
    struct span all = {text, text + len}, result;
    memset(a, 0, sizeof *a);
    a->allow = a->adopted = -1;
    const char *p = ws(all.p, all.end);
    if (p >= all.end || *p != '{') return;
    const char *after = jskip(p, all.end, 0);
    if (after == NULL || ws(after, all.end) != all.end) return;
    int ok = jbool(all, "ok");
    if (ok < 0) return;
    a->valid = 1;
    a->ok = ok;
    jtext(all, "kind", a->kind, sizeof a->kind);
    jtext(all, "error", a->error, sizeof a->error);
    if (!ok || jget(all, "result", &result) < 0 || *result.p != '{') return;
    a->has_result = 1;
    a->allow = jbool(result, "allow");
    a->adopted = jbool(result, "adopted");
    jtext(result, "code", a->code, sizeof a->code);
    jtext(result, "message", a->message, sizeof a->message);
    jtext(result, "job_id", a->job_id, sizeof a->job_id);
}

#ifdef ZTGPU_PAM_SELFTEST
static void show(const char *name, const char *value) {
    printf("%s=", name);
    for (const unsigned char *c = (const unsigned char *)value; *c; c++)
        printf(*c < 0x20 || *c == '\\' || *c >= 0x7f ? "\\x%02x" : "%c", *c);
    printf("\n");
}

int main(void) {
    static char buf[MAX_ANSWER + 1];
    size_t len = fread(buf, 1, MAX_ANSWER, stdin);
    struct answer a;
    read_answer(buf, len, &a);
    printf("valid=%d\nok=%d\nhas_result=%d\nallow=%d\nadopted=%d\n", a.valid, a.ok,
           a.has_result, a.allow, a.adopted);
    show("kind", a.kind);
    show("error", a.error);
    show("code", a.code);
    show("message", a.message);
    show("job_id", a.job_id);
    return 0;
}
#else

/* --------------------------------------------------------------- options */

/* The first N_AGENT_ACTIONS are sent to the agent; no_authd is the auth
 * phase's (pam_python) and only accepted here, the same line serving both. */
enum { A_NO_AGENT, A_NO_JOB, A_ADOPT_FAILURE, A_ERROR, N_AGENT_ACTIONS, A_NO_AUTHD = N_AGENT_ACTIONS,
       N_ACTIONS };
static const char *const ACTION_NAMES[N_ACTIONS] = {"no_agent", "no_job", "adopt_failure",
                                                    "error", "no_authd"};

struct options {
    char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
    double timeout;
    char break_glass[512]; /* comma-separated, validated */
    int allow[N_ACTIONS];
    char log[1024];
    int jit_mfa; /* mfa=jit: JIT logins need the auth phase's TOTP check */
};

static int name_chars_ok(const char *s, size_t n) {
    if (n == 0 || n > 32) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-' || c == '$'))
            return 0;
    }
    return 1;
}

static int names_ok(const char *value) {
    const char *s = value;
    for (;;) {
        const char *comma = strchr(s, ',');
        size_t n = comma ? (size_t)(comma - s) : strlen(s);
        if (!name_chars_ok(s, n)) return 0;
        if (!comma) return 1;
        s = comma + 1;
    }
}

static int in_list(const char *list, const char *user) {
    size_t u = strlen(user);
    const char *s = list;
    while (*s) {
        const char *comma = strchr(s, ',');
        size_t n = comma ? (size_t)(comma - s) : strlen(s);
        if (n == u && memcmp(s, user, n) == 0) return 1;
        if (!comma) break;
        s = comma + 1;
    }
    return 0;
}

/* Parses argv into o; on error writes the reason into err and returns -1. */
static int parse_options(int argc, const char **argv, struct options *o, char *err,
                         size_t cap) {
    memset(o, 0, sizeof *o);
    strcpy(o->socket, DEFAULT_SOCKET);
    o->timeout = 5.0;
    for (int i = 0; i < argc; i++) {
        const char *word = argv[i], *eq = strchr(word, '=');
        if (eq == NULL) {
            snprintf(err, cap, "option '%.100s' has no '=': options are key=value", word);
            return -1;
        }
        size_t klen = (size_t)(eq - word);
        const char *value = eq + 1;
#define KEY(name) (klen == strlen(name) && memcmp(word, name, klen) == 0)
        if (KEY("socket")) {
            if (value[0] != '/' || strlen(value) >= sizeof o->socket) {
                snprintf(err, cap, "socket='%.200s' is not an absolute path (of at most %zu "
                         "bytes)", value, sizeof o->socket - 1);
                return -1;
            }
            strcpy(o->socket, value);
        } else if (KEY("timeout")) {
            char *rest;
            errno = 0;
            double t = strtod(value, &rest);
            if (errno != 0 || rest == value || *rest != '\0') {
                snprintf(err, cap, "timeout='%.100s' is not a number of seconds", value);
                return -1;
            }
            if (!(t > 0 && t <= 30)) {
                snprintf(err, cap, "timeout='%.100s' must be more than 0 and at most 30", value);
                return -1;
            }
            o->timeout = t;
        } else if (KEY("break_glass")) {
            if (!names_ok(value) || strlen(value) >= sizeof o->break_glass) {
                snprintf(err, cap, "break_glass='%.200s' is not a comma-separated list of user "
                         "names", value);
                return -1;
            }
            strcpy(o->break_glass, value);
        } else if (KEY("mode")) {
            if (strcmp(value, "login") == 0) {
                snprintf(err, cap, "mode=login (TOTP on login nodes) is the pam_python "
                         "module's: `ztgpu install --pam SERVICE --pam-mfa login`");
                return -1;
            }
            if (strcmp(value, "compute") != 0) {
                snprintf(err, cap, "mode='%.100s': the mode is 'compute' or 'login'", value);
                return -1;
            }
        } else if (KEY("mfa")) {
            if (strcmp(value, "jit") == 0) o->jit_mfa = 1;
            else if (strcmp(value, "off") == 0) o->jit_mfa = 0;
            else {
                snprintf(err, cap, "mfa='%.100s': 'off' or 'jit'", value);
                return -1;
            }
        } else if (KEY("config") || KEY("state_dir")) { /* the auth phase's: checked only */
            if (value[0] != '/') {
                snprintf(err, cap, "%.*s='%.200s' is not an absolute path", (int)klen, word,
                         value);
                return -1;
            }
        } else if (KEY("log")) {
            if (value[0] != '/' || strlen(value) >= sizeof o->log) {
                snprintf(err, cap, "log='%.200s' is not an absolute path", value);
                return -1;
            }
            strcpy(o->log, value);
        } else {
            int matched = 0;
            for (int a = 0; a < N_ACTIONS; a++) {
                char key[32];
                snprintf(key, sizeof key, "action_%s", ACTION_NAMES[a]);
                if (!KEY(key)) continue;
                matched = 1;
                if (strcmp(value, "deny") == 0) o->allow[a] = 0;
                else if (strcmp(value, "allow") == 0) o->allow[a] = 1;
                else {
                    snprintf(err, cap, "%s='%.100s': the action is 'deny' or 'allow'", key,
                             value);
                    return -1;
                }
            }
            if (!matched) {
                snprintf(err, cap, "unknown option '%.*s' (known: socket, timeout, "
                         "break_glass, log, mode, mfa, config, state_dir, action_no_agent, action_no_job, "
                         "action_adopt_failure, action_error, action_no_authd)", (int)(klen > 100 ? 100 : klen),
                         word);
                return -1;
            }
        }
#undef KEY
    }
    return 0;
}

/* The break-glass accounts of a line that does not parse, if that word is good. */
static void break_glass_of(int argc, const char **argv, char *out, size_t cap) {
    out[0] = '\0';
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "break_glass=", 12) != 0) continue;
        const char *value = argv[i] + 12;
        if (!names_ok(value) || strlen(value) >= cap) {
            out[0] = '\0';
            return;
        }
        strcpy(out, value);
    }
}

static void log_only(int argc, const char **argv, char *out, size_t cap) {
    out[0] = '\0';
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "log=/", 5) == 0 && strlen(argv[i] + 4) < cap)
            strcpy(out, argv[i] + 4);
}

/* ------------------------------------------------------------------- log */

static void say(pam_handle_t *pamh, const char *logfile, int error, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void say(pam_handle_t *pamh, const char *logfile, int error, const char *fmt, ...) {
    char text[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    pam_syslog(pamh, error ? LOG_ERR : LOG_INFO, "%s", text);
    if (logfile == NULL || logfile[0] == '\0') return;
    int fd = open(logfile, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        pam_syslog(pamh, LOG_ERR, "cannot write %s: %s", logfile, strerror(errno));
        return;
    }
    char stamp[64], line[2300];
    time_t now = time(NULL);
    struct tm tm;
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S%z", localtime_r(&now, &tm));
    int n = snprintf(line, sizeof line, "%s ztgpu-pam[%d] %s\n", stamp, (int)getpid(), text);
    if (n > 0) {
        ssize_t w = write(fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
        (void)w;
    }
    close(fd);
}

/* ----------------------------------------------------------------- agent */

/* Appends s as a JSON string (escaped, ASCII) to buf; -1 if it does not fit. */
static int put_json(char *buf, size_t cap, size_t *n, const char *s) {
    if (*n + 1 >= cap) return -1;
    buf[(*n)++] = '"';
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        char esc[8];
        size_t k;
        if (*c == '"' || *c == '\\') { esc[0] = '\\'; esc[1] = (char)*c; k = 2; }
        else if (*c < 0x20 || *c >= 0x7f) { snprintf(esc, sizeof esc, "\\u%04x", *c); k = 6; }
        else { esc[0] = (char)*c; k = 1; }
        if (*n + k + 1 >= cap) return -1;
        memcpy(buf + *n, esc, k);
        *n += k;
    }
    buf[(*n)++] = '"';
    return 0;
}

static int put_raw(char *buf, size_t cap, size_t *n, const char *s) {
    size_t k = strlen(s);
    if (*n + k >= cap) return -1;
    memcpy(buf + *n, s, k);
    *n += k;
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

enum { XCH_DONE, XCH_UNREACHABLE, XCH_BUSY };

/* One exchange. XCH_UNREACHABLE with the reason in why. */
static int exchange_once(const char *path, const char *req, size_t reqlen, double deadline,
                         char *out, size_t *outlen, char *why, size_t whycap) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, path); /* length checked by parse_options */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(why, whycap, "cannot talk to ztgpu-noded on %s: %s", path, strerror(errno));
        return XCH_UNREACHABLE;
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(fd);
        if (e == EAGAIN) return XCH_BUSY; /* the listen backlog is full */
        if (e == ENOENT) snprintf(why, whycap, "ztgpu-noded is not running (no socket at %s)", path);
        else if (e == ECONNREFUSED)
            snprintf(why, whycap, "ztgpu-noded is not accepting connections on %s", path);
        else if (e == EACCES || e == EPERM)
            snprintf(why, whycap, "permission denied on %s: only root and the Slurm user may "
                     "talk to ztgpu-noded", path);
        else snprintf(why, whycap, "cannot talk to ztgpu-noded on %s: %s", path, strerror(e));
        return XCH_UNREACHABLE;
    }
    size_t sent = 0, got = 0;
    int wrote_all = 0;
    for (;;) {
        int left = (int)((deadline - now_s()) * 1000);
        if (left <= 0) {
            close(fd);
            snprintf(why, whycap, "ztgpu-noded did not answer in time on %s", path);
            return XCH_UNREACHABLE;
        }
        struct pollfd pfd = {fd, wrote_all ? POLLIN : POLLOUT | POLLIN, 0};
        int r = poll(&pfd, 1, left);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) break;
        if (r == 0) continue;
        if (!wrote_all && (pfd.revents & POLLOUT)) {
            ssize_t w = send(fd, req + sent, reqlen - sent, MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN && errno != EINTR) break;
            if (w > 0) sent += (size_t)w;
            if (sent == reqlen) {
                shutdown(fd, SHUT_WR);
                wrote_all = 1;
            }
            continue;
        }
        if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
            if (got >= MAX_ANSWER) {
                close(fd);
                snprintf(why, whycap, "the node agent's answer is too large");
                return XCH_UNREACHABLE;
            }
            ssize_t k = recv(fd, out + got, MAX_ANSWER - got, 0);
            if (k < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (k < 0) break;
            if (k == 0) {
                close(fd);
                *outlen = got;
                return XCH_DONE;
            }
            got += (size_t)k;
        }
    }
    int e = errno;
    close(fd);
    snprintf(why, whycap, "cannot talk to ztgpu-noded on %s: %s", path, strerror(e));
    return XCH_UNREACHABLE;
}

/* Asks the agent; retries while it is busy. 0 with *a filled, or -1 with
 * the reason in why (the agent cannot be reached). */
static int ask(const struct options *o, const char *req, size_t reqlen, struct answer *a,
               char *why, size_t whycap) {
    static const char busy[] = "{\"ok\":false,\"kind\":\"busy\"";
    memset(a, 0, sizeof *a); /* "not valid" until an answer is read */
    char *raw = malloc(MAX_ANSWER);
    if (raw == NULL) {
        snprintf(why, whycap, "out of memory");
        return -1;
    }
    double deadline = now_s() + o->timeout, pause = 0.02;
    int status = -1;
    for (;;) {
        size_t len = 0;
        int x = exchange_once(o->socket, req, reqlen, deadline, raw, &len, why, whycap);
        if (x == XCH_UNREACHABLE) break;
        int is_busy = x == XCH_BUSY || (len >= sizeof busy - 1 && memcmp(raw, busy, sizeof busy - 1) == 0);
        if (!is_busy || now_s() + pause >= deadline) {
            if (is_busy && x == XCH_BUSY) {
                snprintf(why, whycap, "ztgpu-noded's socket %s is full", o->socket);
                break;
            }
            read_answer(raw, len, a);
            status = 0;
            break;
        }
        struct timespec ts = {0, (long)(pause * 1e9)};
        nanosleep(&ts, NULL);
        pause = pause * 2 > 0.5 ? 0.5 : pause * 2;
    }
    free(raw);
    return status;
}

static size_t request(char *buf, size_t cap, const char *op, const struct options *o,
                      const char *user, const char *rhost, const char *service,
                      int target_self, int break_glass /* -1: not sent */) {
    size_t n = 0;
    int bad = put_raw(buf, cap, &n, "{\"v\":1,\"op\":") || put_json(buf, cap, &n, op)
        || put_raw(buf, cap, &n, ",\"user\":") || put_json(buf, cap, &n, user)
        || put_raw(buf, cap, &n, ",\"rhost\":") || put_json(buf, cap, &n, rhost)
        || put_raw(buf, cap, &n, ",\"service\":") || put_json(buf, cap, &n, service)
        || put_raw(buf, cap, &n, ",\"actions\":{");
    for (int a = 0; !bad && a < N_AGENT_ACTIONS; a++)
        bad = (a && put_raw(buf, cap, &n, ",")) || put_json(buf, cap, &n, ACTION_NAMES[a])
            || put_raw(buf, cap, &n, o->allow[a] ? ":\"allow\"" : ":\"deny\"");
    bad = bad || put_raw(buf, cap, &n, "}");
    if (!bad && target_self) bad = put_raw(buf, cap, &n, ",\"target\":\"self\"");
    if (!bad && !target_self && o->jit_mfa) bad = put_raw(buf, cap, &n, ",\"jit_mfa\":true");
    if (!bad && break_glass >= 0)
        bad = put_raw(buf, cap, &n, break_glass ? ",\"break_glass\":true" : ",\"break_glass\":false");
    bad = bad || put_raw(buf, cap, &n, "}\n");
    return bad ? 0 : n;
}

/* ------------------------------------------------------------- decisions */

struct login {
    pam_handle_t *pamh;
    const char *phase;
    const char *user;
    const char *rhost;
    const char *service;
    char who[512];
};

static void tell(struct login *l, int allowed, const char *message) {
    if (message == NULL || message[0] == '\0') return;
    pam_prompt(l->pamh, allowed ? PAM_TEXT_INFO : PAM_ERROR_MSG, NULL, "%s", message);
}

/* A failure mode's named action, logged either way. Returns 1 to allow. */
static int fallback(struct login *l, const struct options *o, int action, const char *why,
                    const char *message) {
    int allow = o->allow[action];
    say(l->pamh, o->log, 1, "%s: %s; action_%s=%s", l->who, why, ACTION_NAMES[action],
        allow ? "allow" : "deny");
    if (!allow) {
        char text[MAX_TEXT + 64];
        if (message && message[0]) snprintf(text, sizeof text, "%s", message);
        else snprintf(text, sizeof text, "ztgpu: access denied: %s", why);
        tell(l, 0, text);
    }
    return allow;
}

static int is_exempt(const struct options *o, const char *user) {
    return strcmp(user, "root") == 0 || in_list(o->break_glass, user);
}

/* An answer that is not what the protocol says: the "internal error" case. */
static const char *broken(const struct answer *a) {
    if (!a->valid) return "the node agent answered something that is not JSON";
    if (!a->ok) return NULL;
    if (!a->has_result) return "the node agent's answer has no result object";
    return NULL;
}

static int do_account(struct login *l, const struct options *o) {
    char req[MAX_REQUEST], why[512];
    struct answer a;
    int exempt = is_exempt(o, l->user);
    if (strcmp(l->user, "root") == 0) {
        say(l->pamh, o->log, 0, "%s: allowed (root)", l->who);
        return 1;
    }
    size_t n = request(req, sizeof req, "ssh_account", o, l->user, l->rhost, l->service, 0,
                       exempt ? 1 : -1);
    if (n == 0) {
        if (exempt) return 1;
        return fallback(l, o, A_ERROR, "internal error (the request does not fit)",
                        "ztgpu: access denied: internal error (logged)");
    }
    if (exempt) {
        say(l->pamh, o->log, 0, "%s: allowed (break-glass account)", l->who);
        if (ask(o, req, n, &a, why, sizeof why) < 0 || !a.valid || !a.ok)
            say(l->pamh, o->log, 1, "%s: break-glass login not recorded by the agent: %s",
                l->who, a.valid ? a.error : why);
        return 1;
    }
    if (ask(o, req, n, &a, why, sizeof why) < 0) {
        char reason[600];
        snprintf(reason, sizeof reason, "the node agent cannot be reached (%s)", why);
        return fallback(l, o, A_NO_AGENT, reason,
                        "ztgpu: access denied: the node's access service is down");
    }
    const char *bad = broken(&a);
    if (bad == NULL && !a.ok) bad = a.error[0] ? a.error : "the node agent refused the request";
    if (bad != NULL) {
        char reason[MAX_TEXT + 32];
        say(l->pamh, o->log, 1, "%s: internal error: %s", l->who, bad);
        snprintf(reason, sizeof reason, "internal error (%.200s)", bad);
        return fallback(l, o, A_ERROR, reason, "ztgpu: access denied: internal error (logged)");
    }
    if (a.allow == 1) {
        say(l->pamh, o->log, 0, "%s: allowed (%s)", l->who, a.code);
        tell(l, 1, a.message);
        return 1;
    }
    char reason[128];
    snprintf(reason, sizeof reason, "refused by the node agent (%s)", a.code[0] ? a.code : "None");
    return fallback(l, o, strcmp(a.code, "no_job") == 0 ? A_NO_JOB : A_ERROR, reason,
                    a.message[0] ? a.message : "ztgpu: access denied");
}

static int do_open(struct login *l, const struct options *o) {
    char req[MAX_REQUEST], why[512];
    struct answer a;
    int root = strcmp(l->user, "root") == 0;
    int glass = !root && in_list(o->break_glass, l->user);
    size_t n = request(req, sizeof req, "ssh_open", o, l->user, l->rhost, l->service, 1, glass);
    if (n == 0) {
        if (root || glass) return 1;
        return fallback(l, o, A_ERROR, "internal error (the request does not fit)",
                        "ztgpu: access denied: internal error (logged)");
    }
    if (ask(o, req, n, &a, why, sizeof why) < 0) {
        if (root || glass) {
            say(l->pamh, o->log, 1, "%s: %s; let in as root/break-glass", l->who, why);
            return 1;
        }
        char reason[600];
        snprintf(reason, sizeof reason, "the node agent cannot be reached (%s)", why);
        return fallback(l, o, A_NO_AGENT, reason,
                        "ztgpu: access denied: the node's access service is down");
    }
    const char *bad = broken(&a);
    if (bad == NULL && !a.ok && strcmp(a.kind, "fault") != 0 && strcmp(a.kind, "busy") != 0)
        bad = a.error[0] ? a.error : "the node agent refused the request";
    if (bad != NULL) {
        char reason[MAX_TEXT + 32];
        if (root || glass) return 1;
        say(l->pamh, o->log, 1, "%s: internal error: %s", l->who, bad);
        snprintf(reason, sizeof reason, "internal error (%.200s)", bad);
        return fallback(l, o, A_ERROR, reason, "ztgpu: access denied: internal error (logged)");
    }
    if (!a.ok) { /* the agent could not put the session into the job */
        if (root || glass) {
            say(l->pamh, o->log, 1, "%s: not adopted (%s); root/break-glass session allowed",
                l->who, a.error);
            return 1;
        }
        return fallback(l, o, A_ADOPT_FAILURE, a.error,
                        "ztgpu: this session could not be put into your job");
    }
    if (strcmp(a.code, "no_job") == 0)
        return fallback(l, o, A_NO_JOB, "no running job here to put the session in",
                        a.message[0] ? a.message : "ztgpu: access denied");
    if (a.adopted == 1) say(l->pamh, o->log, 0, "%s: adopted into job %s", l->who, a.job_id);
    else say(l->pamh, o->log, 0, "%s: not adopted", l->who);
    tell(l, 1, a.message);
    return 1;
}

static void do_close(struct login *l, const struct options *o) {
    char req[MAX_REQUEST], why[512];
    struct answer a;
    size_t n = request(req, sizeof req, "ssh_close", o, l->user, l->rhost, l->service, 1, -1);
    if (n == 0) return;
    if (ask(o, req, n, &a, why, sizeof why) < 0)
        say(l->pamh, o->log, 1, "%s: session end not recorded: %s", l->who, why);
    else if (!a.valid || !a.ok)
        say(l->pamh, o->log, 1, "%s: session end not recorded: %s", l->who,
            a.valid ? a.error : "the node agent answered something that is not JSON");
}

static const char *item(pam_handle_t *pamh, int type) {
    const void *value = NULL;
    if (pam_get_item(pamh, type, &value) != PAM_SUCCESS || value == NULL) return "";
    return (const char *)value;
}

enum { PHASE_ACCOUNT, PHASE_OPEN, PHASE_CLOSE };

static int run(pam_handle_t *pamh, int phase, int argc, const char **argv) {
    static const char *const names[] = {"account", "open_session", "close_session"};
    struct login l = {pamh, names[phase], NULL, NULL, NULL, {0}};
    const char *user = NULL;
    int refused = phase == PHASE_ACCOUNT ? PAM_PERM_DENIED : PAM_SESSION_ERR;
    int failed = phase == PHASE_ACCOUNT ? PAM_SYSTEM_ERR : PAM_SESSION_ERR;
    if (pam_get_user(pamh, &user, NULL) != PAM_SUCCESS || user == NULL || user[0] == '\0') {
        pam_syslog(pamh, LOG_ERR, "%s: no user name; refused", l.phase);
        return phase == PHASE_CLOSE ? PAM_SUCCESS : failed;
    }
    l.user = user;
    l.rhost = item(pamh, PAM_RHOST);
    l.service = item(pamh, PAM_SERVICE);
    if (l.service[0] == '\0') l.service = "sshd";
    snprintf(l.who, sizeof l.who, "%.64s %s user='%.64s' rhost='%.200s'", l.service, l.phase,
             l.user, l.rhost[0] ? l.rhost : "-");

    struct options o;
    char err[512];
    if (parse_options(argc, argv, &o, err, sizeof err) < 0) {
        char glass[512], logfile[1024];
        break_glass_of(argc, argv, glass, sizeof glass);
        log_only(argc, argv, logfile, sizeof logfile);
        if (phase == PHASE_CLOSE) return PAM_SUCCESS;
        if (strcmp(user, "root") == 0 || in_list(glass, user)) {
            say(pamh, logfile, 1, "%s: configuration error (%s); %s let in as root/break-glass",
                l.who, err, user);
            return PAM_SUCCESS;
        }
        say(pamh, logfile, 1, "%s: configuration error, login refused: %s", l.who, err);
        tell(&l, 0, "ztgpu: access denied: the node's PAM configuration is broken; tell the "
                    "administrators");
        return failed;
    }
    switch (phase) {
    case PHASE_ACCOUNT:
        return do_account(&l, &o) ? PAM_SUCCESS : refused;
    case PHASE_OPEN:
        return do_open(&l, &o) ? PAM_SUCCESS : refused;
    default:
        do_close(&l, &o);
        return PAM_SUCCESS;
    }
}

PAM_EXTERN int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)flags;
    return run(pamh, PHASE_ACCOUNT, argc, argv);
}

PAM_EXTERN int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)flags;
    return run(pamh, PHASE_OPEN, argc, argv);
}

PAM_EXTERN int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc,
                                    const char **argv) {
    (void)flags;
    return run(pamh, PHASE_CLOSE, argc, argv);
}

/* The auth phase is the pam_python module's (TOTP on login nodes and for
 * JIT access): here it lets the rest of the stack decide. */
PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}
#endif
