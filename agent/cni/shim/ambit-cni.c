/*
 * ambit-cni, host binary: the CNI plugin the container runtime executes on a node.
 *
 * Why it exists: the runtime executes CNI plugins from /opt/cni/bin on the host, outside
 * our container image, where the agent's Python does not exist (and the node may have no
 * Python at all). So the binary in /opt/cni/bin is this static C program (no loader, no
 * shared libraries: it runs on any x86_64 Linux node), and it does as little as it can:
 * it forwards the invocation to the node agent, which runs the one implementation of the
 * plugin (agent/cni/plugin.py, handle()) in-process, and relays the answer.
 *
 * Protocol, on the agent's Unix socket (the config's "agentSocket", default
 * /var/run/ambit/cni.sock), one request per connection, one JSON line each way:
 *
 *   -> {"op":"exec","env":{"CNI_COMMAND":"ADD",...},"stdin":"<the network config>"}
 *   <- {"exit":0,"stdout":"<print this>","stderr":"<log this>"}
 *
 * "env" holds the CNI_* variables that are set. Strings carry bytes the way Python's
 * surrogateescape does: valid UTF-8 as text, every other byte as \udcXX, so the agent sees
 * exactly what os.environ and sys.stdin would have given the Python plugin. The answer is
 * written to stdout/stderr as is and its "exit" becomes our exit status.
 *
 * What cannot be forwarded is done here, mirroring plugin.py message for message (the
 * differential test tests/unit/test_cni_shim.py holds the two to the same output):
 *   - CNI_COMMAND missing or unknown (code 7), and VERSION;
 *   - a config the agent socket cannot be read from (bad JSON, bad "agentSocket");
 *   - the agent unreachable, not answering within "timeoutSeconds" (default 10), or
 *     answering something that is not an exec answer: "failurePolicy" applies. fail-closed
 *     (default): ADD and CHECK fail with code 11 ("try again later", the kubelet retries)
 *     or 101 (invalid answer); fail-open: logged, ADD passes prevResult through. DEL always
 *     exits 0 with nothing on stdout.
 * Before applying the policy the invocation is checked in plugin.py's order with its
 * messages (CNI_* variables, then the config keys), so a broken config is reported as such
 * even with the agent down. The one check not repeated is the content of prevResult (its
 * addresses): the main plugin just produced it, and the agent checks it when it is up.
 *
 * To give byte-identical answers, JSON is decoded as Python's json module does (its error
 * messages and positions, NaN/Infinity, UTF-8 with surrogatepass, a leading BOM), values in
 * messages are quoted as Python's repr() quotes them, and output is written as json.dumps
 * writes it (", " and ": ", ASCII only). Known differences, all for inputs no runtime
 * sends: stdin over 1 MiB is refused; stdin in UTF-16/32 is read as UTF-8; repr() of
 * non-ASCII characters knows the common non-printable ones, not all of Unicode's.
 *
 * Style: small static helpers, no global state but the command (for the out-of-memory
 * path); every index is checked against its buffer's length before it is read.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET		"/var/run/ambit/cni.sock"
#define DEFAULT_TIMEOUT		10.0
#define LATEST_VERSION		"1.0.0"
#define MAX_STDIN		(1u << 20)
#define MAX_ANSWER		(16u << 20)
/* Python's json gives up near its recursion limit (1000); going a little further is
 * harmless: a document we accept but Python does not is forwarded, and the agent says so. */
#define MAX_DEPTH		1000
/* sys.get_int_max_str_digits(): json refuses longer integers (a ValueError). */
#define MAX_INT_DIGITS		4300
#define MAX_IFNAME		15
#define MAX_POLL_MS		(3600 * 1000)

#define ERR_INCOMPATIBLE_VERSION	1
#define ERR_INVALID_NETWORK_CONFIG	4
#define ERR_IO				5
#define ERR_INVALID_ENV			7
#define ERR_TRY_AGAIN_LATER		11
#define ERR_AGENT_PROTOCOL		101
#define ERR_INTERNAL			102

/* 0.3.x: flannel's and Calico's default conflists say 0.3.1 (see spec.py). */
static const char *const supported_versions[] = { "0.3.0", "0.3.1", "0.4.0", "1.0.0" };

/* DEL must exit 0 whatever happens, even out of memory. */
static int g_is_del;

/* ---- output and growable buffers ---------------------------------------------------- */

static void write_all(int fd, const void *p, size_t n)
{
	const char *s = p;

	while (n) {
		ssize_t w = write(fd, s, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return; /* nobody reads it: the exit status still tells */
		s += w;
		n -= (size_t)w;
	}
}

/* Out of memory: answer in CNI terms all the same (the message is fixed, no allocation). */
static void __attribute__((noreturn)) oom(void)
{
	static const char err[] = "{\"cniVersion\": \"" LATEST_VERSION "\", \"code\": 102, "
		"\"msg\": \"ambit-cni ran out of memory\", \"details\": \"\"}\n";
	static const char log[] = "ambit-cni: out of memory\n";

	write_all(2, log, sizeof(log) - 1);
	if (g_is_del)
		exit(0);
	write_all(1, err, sizeof(err) - 1);
	exit(1);
}

struct buf {
	char *p;
	size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t extra)
{
	size_t need, cap;
	char *p;

	if (extra > SIZE_MAX / 2 - b->len)
		oom();
	need = b->len + extra + 1; /* room for a NUL, so p is always a C string */
	if (need <= b->cap)
		return;
	cap = b->cap ? b->cap : 256;
	while (cap < need)
		cap *= 2;
	p = realloc(b->p, cap);
	if (!p)
		oom();
	b->p = p;
	b->cap = cap;
}

static void put(struct buf *b, const void *s, size_t n)
{
	buf_reserve(b, n);
	if (n)
		memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = 0;
}

static void puts_(struct buf *b, const char *s)
{
	put(b, s, strlen(s));
}

static void putch(struct buf *b, char c)
{
	put(b, &c, 1);
}

static void __attribute__((format(printf, 2, 3))) putf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	buf_reserve(b, (size_t)n);
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

static const char *cstr(const struct buf *b)
{
	return b->p ? b->p : "";
}

/* Encodes a code point as UTF-8; lone surrogates too (as Python's surrogatepass would), so
 * text holding \udcXX from surrogateescape survives until it is written as JSON. */
static void put_cp(struct buf *b, uint32_t cp)
{
	char u[4];

	if (cp < 0x80) {
		putch(b, (char)cp);
	} else if (cp < 0x800) {
		u[0] = (char)(0xC0 | (cp >> 6));
		u[1] = (char)(0x80 | (cp & 0x3F));
		put(b, u, 2);
	} else if (cp < 0x10000) {
		u[0] = (char)(0xE0 | (cp >> 12));
		u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
		u[2] = (char)(0x80 | (cp & 0x3F));
		put(b, u, 3);
	} else {
		u[0] = (char)(0xF0 | (cp >> 18));
		u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
		u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
		u[3] = (char)(0x80 | (cp & 0x3F));
		put(b, u, 4);
	}
}

/* ---- Unicode text (what a Python str holds) ------------------------------------------ */

struct ustr {
	uint32_t *cp;
	size_t n, cap;
};

static void us_push(struct ustr *u, uint32_t cp)
{
	if (u->n == u->cap) {
		size_t cap = u->cap ? u->cap * 2 : 64;
		uint32_t *p;

		if (cap > SIZE_MAX / 8)
			oom();
		p = realloc(u->cp, cap * sizeof(*p));
		if (!p)
			oom();
		u->cp = p;
		u->cap = cap;
	}
	u->cp[u->n++] = cp;
}

static int us_eq(const struct ustr *u, const char *ascii)
{
	size_t n = strlen(ascii);

	if (u->n != n)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (u->cp[i] != (unsigned char)ascii[i])
			return 0;
	return 1;
}

/* A view of part of another ustr (no storage of its own). An empty ustr has no storage at
 * all (cp NULL), and NULL + 0 is undefined behaviour in C: its views stay NULL. */
static struct ustr us_slice(const struct ustr *u, size_t from, size_t to)
{
	struct ustr v = { u->cp ? u->cp + from : NULL, to - from, 0 };

	return v;
}

/* str.isspace() / re's \s for str patterns. */
static int py_isspace(uint32_t c)
{
	return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 ||
	       c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
	       c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* str.strip() */
static struct ustr us_strip(const struct ustr *u)
{
	size_t a = 0, b = u->n;

	while (a < b && py_isspace(u->cp[a]))
		a++;
	while (b > a && py_isspace(u->cp[b - 1]))
		b--;
	return us_slice(u, a, b);
}

/* str.isprintable() for non-ASCII: the non-printable characters people meet (C1 controls,
 * format characters, odd spaces, line/paragraph separators, surrogates, private use). The
 * full answer needs Unicode's tables; repr() of other unassigned code points differs. */
static int py_isprintable(uint32_t c)
{
	static const uint32_t np[][2] = {
		{ 0x7F, 0xA0 }, { 0xAD, 0xAD }, { 0x378, 0x379 }, { 0x600, 0x605 },
		{ 0x61C, 0x61C }, { 0x6DD, 0x6DD }, { 0x70F, 0x70F }, { 0x180E, 0x180E },
		{ 0x1680, 0x1680 }, { 0x2000, 0x200F }, { 0x2028, 0x202F }, { 0x205F, 0x206F },
		{ 0x3000, 0x3000 }, { 0xD800, 0xF8FF }, { 0xFEFF, 0xFEFF }, { 0xFFF0, 0xFFFB },
		{ 0xFFFE, 0xFFFF }, { 0x1D173, 0x1D17A }, { 0xE0000, 0xE00FF }, { 0xE01F0, 0xE0FFF },
		{ 0xF0000, 0x10FFFF },
	};

	for (size_t i = 0; i < sizeof(np) / sizeof(np[0]); i++)
		if (c >= np[i][0] && c <= np[i][1])
			return 0;
	return 1;
}

/* repr(str), as CPython's unicode_repr writes it. */
static void put_repr(struct buf *b, const struct ustr *u)
{
	int sq = 0, dq = 0;
	char q;

	for (size_t i = 0; i < u->n; i++) {
		sq |= u->cp[i] == '\'';
		dq |= u->cp[i] == '"';
	}
	q = sq && !dq ? '"' : '\'';
	putch(b, q);
	for (size_t i = 0; i < u->n; i++) {
		uint32_t c = u->cp[i];

		if (c == (uint32_t)q || c == '\\') {
			putch(b, '\\');
			putch(b, (char)c);
		} else if (c == '\t') {
			puts_(b, "\\t");
		} else if (c == '\n') {
			puts_(b, "\\n");
		} else if (c == '\r') {
			puts_(b, "\\r");
		} else if (c < 0x20 || c == 0x7F) {
			putf(b, "\\x%02x", c);
		} else if (c < 0x7F || py_isprintable(c)) {
			put_cp(b, c);
		} else if (c <= 0xFF) {
			putf(b, "\\x%02x", c);
		} else if (c <= 0xFFFF) {
			putf(b, "\\u%04x", c);
		} else {
			putf(b, "\\U%08x", c);
		}
	}
	putch(b, q);
}

/* A str as json.dumps writes it (ensure_ascii: anything outside printable ASCII escaped,
 * characters beyond the BMP as a surrogate pair). */
static void put_json_us(struct buf *b, const struct ustr *u)
{
	putch(b, '"');
	for (size_t i = 0; i < u->n; i++) {
		uint32_t c = u->cp[i];

		switch (c) {
		case '"': puts_(b, "\\\""); continue;
		case '\\': puts_(b, "\\\\"); continue;
		case '\n': puts_(b, "\\n"); continue;
		case '\r': puts_(b, "\\r"); continue;
		case '\t': puts_(b, "\\t"); continue;
		case '\b': puts_(b, "\\b"); continue;
		case '\f': puts_(b, "\\f"); continue;
		}
		if (c >= 0x20 && c < 0x7F) {
			putch(b, (char)c);
		} else if (c < 0x10000) {
			putf(b, "\\u%04x", c);
		} else {
			c -= 0x10000;
			putf(b, "\\u%04x\\u%04x", 0xD800 + (c >> 10), 0xDC00 + (c & 0x3FF));
		}
	}
	putch(b, '"');
}

static void put_us(struct buf *b, const struct ustr *u)
{
	for (size_t i = 0; i < u->n; i++)
		put_cp(b, u->cp[i]);
}

/* Back to bytes as os.fsencode() would: \udcXX is the byte XX it stood for. */
static void put_us_bytes(struct buf *b, const struct ustr *u)
{
	for (size_t i = 0; i < u->n; i++) {
		uint32_t c = u->cp[i];

		if (c >= 0xDC80 && c <= 0xDCFF)
			putch(b, (char)(c - 0xDC00));
		else
			put_cp(b, c);
	}
}

/* ---- UTF-8 as CPython decodes it ----------------------------------------------------- */

enum u8err { U8_OK, U8_START, U8_CONT, U8_END };

struct u8 {
	uint32_t cp;
	size_t n;	 /* bytes used, or the length of the bad range CPython reports */
	enum u8err err;
};

/* One character at s[i]. On error, n is the range CPython's codec reports and hands to its
 * error handler (the lead byte and the valid continuation bytes after it). With
 * surrogates, an encoded surrogate (ED A0..BF 80..BF) is accepted, as json.loads does
 * (it decodes bytes with "surrogatepass"). */
static struct u8 u8_next(const uint8_t *s, size_t len, size_t i, int surrogates)
{
	struct u8 r = { s[i], 1, U8_OK };
	uint8_t c = s[i], lo = 0x80, hi = 0xBF;
	size_t need;

	if (c < 0x80)
		return r;
	if (c < 0xC2 || c > 0xF4) {
		r.err = U8_START;
		return r;
	}
	if (c == 0xED && surrogates && i + 1 < len && s[i + 1] >= 0xA0 && s[i + 1] <= 0xBF) {
		/* surrogatepass takes the three bytes or nothing: else the strict error */
		if (i + 2 < len && s[i + 2] >= 0x80 && s[i + 2] <= 0xBF) {
			r.cp = 0xD000 | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
			r.n = 3;
			return r;
		}
		r.err = U8_CONT;
		return r;
	}
	if (c < 0xE0) {
		need = 1;
		r.cp = c & 0x1F;
	} else if (c < 0xF0) {
		need = 2;
		r.cp = c & 0x0F;
		if (c == 0xE0)
			lo = 0xA0;
		if (c == 0xED)
			hi = 0x9F;
	} else {
		need = 3;
		r.cp = c & 0x07;
		if (c == 0xF0)
			lo = 0x90;
		if (c == 0xF4)
			hi = 0x8F;
	}
	for (size_t k = 1; k <= need; k++) {
		uint8_t cc;

		if (i + k >= len) {
			r.err = U8_END;
			r.n = k;
			return r;
		}
		cc = s[i + k];
		if (k == 1 ? (cc < lo || cc > hi) : (cc < 0x80 || cc > 0xBF)) {
			r.err = U8_CONT;
			r.n = k;
			return r;
		}
		r.cp = (r.cp << 6) | (cc & 0x3F);
	}
	r.n = need + 1;
	return r;
}

enum dec {
	DEC_ESCAPE,	/* surrogateescape: os.environ, and how the exec protocol carries bytes */
	DEC_REPLACE,	/* "replace": how plugin.py reads an agent's answer */
	DEC_PASS,	/* our own text, which may hold surrogates */
};

static void us_decode(struct ustr *u, const uint8_t *s, size_t n, enum dec mode)
{
	for (size_t i = 0; i < n;) {
		struct u8 r = u8_next(s, n, i, mode == DEC_PASS);

		if (r.err == U8_OK)
			us_push(u, r.cp);
		else if (mode == DEC_REPLACE)
			us_push(u, 0xFFFD);
		else
			for (size_t k = 0; k < r.n; k++)
				us_push(u, 0xDC00 + s[i + k]);
		i += r.n;
	}
}

/* Our message text (UTF-8, maybe with surrogates) as a JSON string. */
static void put_json_text(struct buf *b, const struct buf *text)
{
	struct ustr u = { 0 };

	us_decode(&u, (const uint8_t *)cstr(text), text->len, DEC_PASS);
	put_json_us(b, &u);
	free(u.cp);
}

/* ---- JSON, decoded as Python's json.loads(bytes) does -------------------------------- */

struct jdoc {
	const uint8_t *s;	/* the text, after a UTF-8 BOM if there was one */
	size_t len;
	struct buf err;		/* str() of the exception json.loads would raise */
};

struct jspan {
	size_t at, end;
};

enum jtype { J_STR, J_OBJ, J_ARR, J_TRUE, J_FALSE, J_NULL, J_INT, J_FLOAT };

/* JSONDecodeError's text: the position in characters, with line and column. */
static int j_fail(struct jdoc *d, const char *msg, size_t pos)
{
	size_t chars = 0, line = 1, nl = 0;
	int seen_nl = 0;

	for (size_t i = 0; i < pos && i < d->len; i++) {
		if ((d->s[i] & 0xC0) == 0x80)
			continue; /* a continuation byte: not a new character */
		if (d->s[i] == '\n') {
			line++;
			nl = chars;
			seen_nl = 1;
		}
		chars++;
	}
	d->err.len = 0;
	putf(&d->err, "%s: line %zu column %zu (char %zu)", msg, line,
	     seen_nl ? chars - nl : chars + 1, chars);
	return -1;
}

/* Errors Python raises without a position (RecursionError, the integer digit limit). */
static int j_fail_plain(struct jdoc *d, const char *msg)
{
	d->err.len = 0;
	puts_(&d->err, msg);
	return -1;
}

static int is_jws(uint8_t c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static size_t j_ws(const struct jdoc *d, size_t i)
{
	while (i < d->len && is_jws(d->s[i]))
		i++;
	return i;
}

static int is_hex(uint8_t c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static int is_digit(uint8_t c)
{
	return c >= '0' && c <= '9';
}

/* A string at its opening quote q; mirrors _json.c's scanstring_unicode (strict mode),
 * including where it reports each error. */
static int j_string(struct jdoc *d, size_t q, size_t *end)
{
	size_t i = q + 1;

	for (;;) {
		uint8_t c;

		if (i >= d->len)
			return j_fail(d, "Unterminated string starting at", q);
		c = d->s[i];
		if (c == '"') {
			*end = i + 1;
			return 0;
		}
		if (c < 0x20)
			return j_fail(d, "Invalid control character at", i);
		if (c != '\\') {
			i += u8_next(d->s, d->len, i, 1).n; /* the document is valid UTF-8 */
			continue;
		}
		if (i + 1 >= d->len)
			return j_fail(d, "Unterminated string starting at", q);
		c = d->s[i + 1];
		if (c == 'u') {
			/* Python wants the 4 digits and one more character before the end */
			if (i + 6 >= d->len)
				return j_fail(d, "Invalid \\uXXXX escape", i + 1);
			for (size_t k = 2; k < 6; k++)
				if (!is_hex(d->s[i + k]))
					return j_fail(d, "Invalid \\uXXXX escape", i + 1);
			i += 6;
			continue;
		}
		if (!c || !strchr("\"\\/bfnrt", c))
			return j_fail(d, "Invalid \\escape", i);
		i += 2;
	}
}

/* A number; mirrors _match_number_unicode: what does not fit is left for the caller
 * ("1." is the integer 1 followed by "."). */
static int j_number(struct jdoc *d, size_t i, size_t *end)
{
	size_t start = i;
	int is_float = 0;

	if (d->s[i] == '-' && ++i >= d->len)
		return j_fail(d, "Expecting value", start);
	if (d->s[i] >= '1' && d->s[i] <= '9') {
		while (i < d->len && is_digit(d->s[i]))
			i++;
	} else if (d->s[i] == '0') {
		i++;
	} else {
		return j_fail(d, "Expecting value", start);
	}
	if (i + 1 < d->len && d->s[i] == '.' && is_digit(d->s[i + 1])) {
		is_float = 1;
		i += 2;
		while (i < d->len && is_digit(d->s[i]))
			i++;
	}
	if (i + 1 < d->len && (d->s[i] == 'e' || d->s[i] == 'E')) {
		size_t e = i++;

		if (i + 1 < d->len && (d->s[i] == '-' || d->s[i] == '+'))
			i++;
		while (i < d->len && is_digit(d->s[i]))
			i++;
		if (is_digit(d->s[i - 1]))
			is_float = 1;
		else
			i = e;
	}
	if (!is_float) {
		size_t digits = i - start - (d->s[start] == '-');

		if (digits > MAX_INT_DIGITS) {
			d->err.len = 0;
			putf(&d->err, "Exceeds the limit (%d digits) for integer string "
			     "conversion: value has %zu digits; use sys.set_int_max_str_digits() "
			     "to increase the limit", MAX_INT_DIGITS, digits);
			return -1;
		}
	}
	*end = i;
	return 0;
}

static int j_lit(struct jdoc *d, size_t i, const char *lit, size_t *end)
{
	size_t n = strlen(lit);

	if (n > d->len - i || memcmp(d->s + i, lit, n))
		return j_fail(d, "Expecting value", i);
	*end = i + n;
	return 0;
}

static int j_value(struct jdoc *d, size_t i, size_t *end, int depth);

static int j_object(struct jdoc *d, size_t i, size_t *end, int depth)
{
	if (depth > MAX_DEPTH)
		return j_fail_plain(d, "maximum recursion depth exceeded while decoding a JSON "
				    "object from a unicode string");
	i = j_ws(d, i + 1);
	if (i >= d->len || d->s[i] != '}') {
		for (;;) {
			if (i >= d->len || d->s[i] != '"')
				return j_fail(d, "Expecting property name enclosed in double "
					      "quotes", i);
			if (j_string(d, i, &i))
				return -1;
			i = j_ws(d, i);
			if (i >= d->len || d->s[i] != ':')
				return j_fail(d, "Expecting ':' delimiter", i);
			i = j_ws(d, i + 1);
			if (j_value(d, i, &i, depth))
				return -1;
			i = j_ws(d, i);
			if (i < d->len && d->s[i] == '}')
				break;
			if (i >= d->len || d->s[i] != ',')
				return j_fail(d, "Expecting ',' delimiter", i);
			i = j_ws(d, i + 1);
		}
	}
	*end = i + 1;
	return 0;
}

static int j_array(struct jdoc *d, size_t i, size_t *end, int depth)
{
	if (depth > MAX_DEPTH)
		return j_fail_plain(d, "maximum recursion depth exceeded while decoding a JSON "
				    "array from a unicode string");
	i = j_ws(d, i + 1);
	if (i >= d->len || d->s[i] != ']') {
		for (;;) {
			if (j_value(d, i, &i, depth))
				return -1;
			i = j_ws(d, i);
			if (i < d->len && d->s[i] == ']')
				break;
			if (i >= d->len || d->s[i] != ',')
				return j_fail(d, "Expecting ',' delimiter", i);
			i = j_ws(d, i + 1);
		}
	}
	*end = i + 1;
	return 0;
}

/* Any value at i (scan_once_unicode): what is not a value is "Expecting value" at i. */
static int j_value(struct jdoc *d, size_t i, size_t *end, int depth)
{
	if (i >= d->len)
		return j_fail(d, "Expecting value", i);
	switch (d->s[i]) {
	case '"': return j_string(d, i, end);
	case '{': return j_object(d, i, end, depth + 1);
	case '[': return j_array(d, i, end, depth + 1);
	case 'n': return j_lit(d, i, "null", end);
	case 't': return j_lit(d, i, "true", end);
	case 'f': return j_lit(d, i, "false", end);
	case 'N': return j_lit(d, i, "NaN", end);
	case 'I': return j_lit(d, i, "Infinity", end);
	case '-':
		if (d->len - i >= 9 && !memcmp(d->s + i, "-Infinity", 9)) {
			*end = i + 9;
			return 0;
		}
		return j_number(d, i, end);
	default:
		if (is_digit(d->s[i]))
			return j_number(d, i, end);
		return j_fail(d, "Expecting value", i);
	}
}

/* The whole document, as json.loads(bytes): UTF-8 (a BOM skipped, surrogates passed)
 * decoded first, then one value with only whitespace around it. */
static int j_parse(struct jdoc *d, const uint8_t *s, size_t len, struct jspan *top)
{
	size_t i;

	if (len >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3)) {
		s += 3;
		len -= 3;
	}
	d->s = s;
	d->len = len;
	for (i = 0; i < len;) {
		struct u8 r = u8_next(s, len, i, 1);
		const char *why = r.err == U8_START ? "invalid start byte" :
				  r.err == U8_CONT ? "invalid continuation byte" :
						     "unexpected end of data";

		if (r.err == U8_OK) {
			i += r.n;
			continue;
		}
		d->err.len = 0;
		if (r.n == 1)
			putf(&d->err, "'utf-8' codec can't decode byte 0x%02x in position %zu: %s",
			     s[i], i, why);
		else
			putf(&d->err, "'utf-8' codec can't decode bytes in position %zu-%zu: %s",
			     i, i + r.n - 1, why);
		return -1;
	}
	top->at = j_ws(d, 0);
	if (j_value(d, top->at, &top->end, 0))
		return -1;
	i = j_ws(d, top->end);
	if (i != len)
		return j_fail(d, "Extra data", i);
	return 0;
}

/* ---- reading a validated document ----------------------------------------------------- */

/* The end of the (valid) value at i. */
static size_t j_skip(struct jdoc *d, size_t i)
{
	size_t end = i;

	j_value(d, i, &end, 0);
	return end;
}

/* Steps through a valid object or array: *pos starts at its '{' or '['; each call gives
 * the next member (key is NULL for arrays). */
static int j_next(struct jdoc *d, size_t *pos, struct jspan *key, struct jspan *val)
{
	size_t i = *pos;

	if (d->s[i] == '}' || d->s[i] == ']')
		return 0;
	i = j_ws(d, i + 1); /* past '{', '[' or ',' */
	if (d->s[i] == '}' || d->s[i] == ']') {
		*pos = i;
		return 0;
	}
	if (key) {
		key->at = i;
		key->end = j_skip(d, i);
		i = j_ws(d, j_ws(d, key->end) + 1); /* past ':' */
	}
	val->at = i;
	val->end = j_skip(d, i);
	*pos = j_ws(d, val->end); /* at ',' or the closing bracket */
	return 1;
}

static enum jtype j_type(const struct jdoc *d, struct jspan v)
{
	switch (d->s[v.at]) {
	case '"': return J_STR;
	case '{': return J_OBJ;
	case '[': return J_ARR;
	case 't': return J_TRUE;
	case 'f': return J_FALSE;
	case 'n': return J_NULL;
	case 'N': case 'I': return J_FLOAT;
	}
	for (size_t i = v.at; i < v.end; i++)
		if (strchr(".eEI", d->s[i]))
			return J_FLOAT;
	return J_INT;
}

/* type(value).__name__ */
static const char *py_type(enum jtype t)
{
	static const char *const names[] = {
		[J_STR] = "str", [J_OBJ] = "dict", [J_ARR] = "list", [J_TRUE] = "bool",
		[J_FALSE] = "bool", [J_NULL] = "NoneType", [J_INT] = "int", [J_FLOAT] = "float",
	};

	return names[t];
}

static uint32_t hex4(const uint8_t *p)
{
	uint32_t v = 0;

	for (int k = 0; k < 4; k++) {
		uint8_t c = p[k];

		v = v << 4 | (uint32_t)(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
	}
	return v;
}

/* The str a valid JSON string decodes to (a \ud8xx\udcxx escape pair joined, as Python
 * does; anything else, lone surrogates included, kept as is). */
static struct ustr j_str(const struct jdoc *d, struct jspan v)
{
	struct ustr u = { 0 };
	size_t i = v.at + 1, end = v.end - 1;

	while (i < end) {
		uint8_t c = d->s[i];
		uint32_t cp;

		if (c != '\\') {
			struct u8 r = u8_next(d->s, d->len, i, 1);

			us_push(&u, r.cp);
			i += r.n;
			continue;
		}
		c = d->s[i + 1];
		if (c != 'u') {
			static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";

			us_push(&u, (unsigned char)to[strchr(from, c) - from]);
			i += 2;
			continue;
		}
		cp = hex4(d->s + i + 2);
		i += 6;
		if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= end && d->s[i] == '\\' &&
		    d->s[i + 1] == 'u') {
			uint32_t lo = hex4(d->s + i + 2);

			if (lo >= 0xDC00 && lo <= 0xDFFF) {
				cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
				i += 6;
			}
		}
		us_push(&u, cp);
	}
	return u;
}

static int j_str_is(const struct jdoc *d, struct jspan v, const char *ascii)
{
	struct ustr u;
	int eq;

	if (j_type(d, v) != J_STR)
		return 0;
	u = j_str(d, v);
	eq = us_eq(&u, ascii);
	free(u.cp);
	return eq;
}

static int j_key_eq(const struct jdoc *d, struct jspan a, struct jspan b)
{
	struct ustr x = j_str(d, a), y = j_str(d, b);
	int eq = x.n == y.n && (!x.n || !memcmp(x.cp, y.cp, x.n * sizeof(*x.cp)));

	free(x.cp);
	free(y.cp);
	return eq;
}

/* dict.get(key) on a valid object: the last of duplicate keys wins, as in a Python dict. */
static int j_get(struct jdoc *d, struct jspan obj, const char *key, struct jspan *out)
{
	size_t pos = obj.at;
	struct jspan k, v;
	int found = 0;

	while (j_next(d, &pos, &k, &v))
		if (j_str_is(d, k, key)) {
			*out = v;
			found = 1;
		}
	return found;
}

/* float(lexeme) */
static double j_float(const struct jdoc *d, struct jspan v)
{
	size_t n = v.end - v.at;
	char *tmp;
	double x;

	if (d->s[v.at] == 'N')
		return NAN;
	if (d->s[v.at] == 'I')
		return INFINITY;
	if (n >= 2 && d->s[v.at] == '-' && d->s[v.at + 1] == 'I')
		return -INFINITY;
	tmp = malloc(n + 1);
	if (!tmp)
		oom();
	memcpy(tmp, d->s + v.at, n);
	tmp[n] = 0;
	x = strtod(tmp, NULL);
	free(tmp);
	return x;
}

/* repr(float): the shortest digits that read back the same, in Python's layout. */
static void put_pyfloat(struct buf *b, double x, int json)
{
	char tmp[40], digits[24];
	int prec, exp, nd = 0, decpt;
	char *p;

	if (isnan(x)) {
		puts_(b, json ? "NaN" : "nan");
		return;
	}
	if (isinf(x)) {
		puts_(b, x < 0 ? (json ? "-Infinity" : "-inf") : (json ? "Infinity" : "inf"));
		return;
	}
	for (prec = 1; prec < 17; prec++) {
		snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, x);
		if (strtod(tmp, NULL) == x)
			break;
	}
	snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, x);
	p = tmp;
	if (*p == '-') {
		putch(b, '-');
		p++;
	}
	for (; *p && *p != 'e'; p++)
		if (is_digit((uint8_t)*p))
			digits[nd++] = *p;
	exp = atoi(p + 1);
	while (nd > 1 && digits[nd - 1] == '0')
		nd--;
	decpt = exp + 1;
	if (decpt > -4 && decpt <= 16) {
		if (decpt <= 0) {
			puts_(b, "0.");
			for (int k = 0; k < -decpt; k++)
				putch(b, '0');
			put(b, digits, (size_t)nd);
		} else if (decpt >= nd) {
			put(b, digits, (size_t)nd);
			for (int k = nd; k < decpt; k++)
				putch(b, '0');
			puts_(b, ".0");
		} else {
			put(b, digits, (size_t)decpt);
			putch(b, '.');
			put(b, digits + decpt, (size_t)(nd - decpt));
		}
	} else {
		putch(b, digits[0]);
		if (nd > 1) {
			putch(b, '.');
			put(b, digits + 1, (size_t)(nd - 1));
		}
		putf(b, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
	}
}

/* A valid value as Python shows it: repr() of what json.loads returns (json = 0), or
 * json.dumps() of it (json = 1). extra_key/extra_val: dict.setdefault on an object. */
static void put_value(struct buf *b, struct jdoc *d, struct jspan v, int json,
		      const char *extra_key, const char *extra_val)
{
	enum jtype t = j_type(d, v);
	struct ustr u;

	switch (t) {
	case J_STR:
		u = j_str(d, v);
		if (json)
			put_json_us(b, &u);
		else
			put_repr(b, &u);
		free(u.cp);
		return;
	case J_TRUE: puts_(b, json ? "true" : "True"); return;
	case J_FALSE: puts_(b, json ? "false" : "False"); return;
	case J_NULL: puts_(b, json ? "null" : "None"); return;
	case J_INT:
		/* int(lexeme) prints as the lexeme: JSON has no leading zeros, only -0 */
		if (v.end - v.at == 2 && !memcmp(d->s + v.at, "-0", 2))
			putch(b, '0');
		else
			put(b, d->s + v.at, v.end - v.at);
		return;
	case J_FLOAT:
		put_pyfloat(b, j_float(d, v), json);
		return;
	case J_ARR: {
		size_t pos = v.at;
		struct jspan e;
		int first = 1;

		putch(b, '[');
		while (j_next(d, &pos, NULL, &e)) {
			if (!first)
				puts_(b, ", ");
			first = 0;
			put_value(b, d, e, json, NULL, NULL);
		}
		putch(b, ']');
		return;
	}
	case J_OBJ: {
		/* A dict keeps a key where it first appeared, with the value it got last. */
		struct jspan (*m)[2] = NULL;
		size_t n = 0, cap = 0, pos = v.at;
		struct jspan k, val;
		int first = 1, has_extra = 0;

		while (j_next(d, &pos, &k, &val)) {
			if (n == cap) {
				void *p;

				cap = cap ? cap * 2 : 16;
				p = realloc(m, cap * sizeof(*m));
				if (!p)
					oom();
				m = p;
			}
			m[n][0] = k;
			m[n][1] = val;
			n++;
		}
		putch(b, '{');
		for (size_t i = 0; i < n; i++) {
			size_t last = i, j;

			for (j = 0; j < i && !j_key_eq(d, m[j][0], m[i][0]); j++)
				;
			if (j < i)
				continue;
			for (j = i + 1; j < n; j++)
				if (j_key_eq(d, m[j][0], m[i][0]))
					last = j;
			if (extra_key && j_str_is(d, m[i][0], extra_key))
				has_extra = 1;
			if (!first)
				puts_(b, ", ");
			first = 0;
			put_value(b, d, m[i][0], json, NULL, NULL);
			puts_(b, ": ");
			put_value(b, d, m[last][1], json, NULL, NULL);
		}
		if (extra_key && !has_extra)
			putf(b, "%s\"%s\": \"%s\"", first ? "" : ", ", extra_key, extra_val);
		putch(b, '}');
		free(m);
		return;
	}
	}
}

/* ---- the invocation ------------------------------------------------------------------- */

/* The CNI variables, in the order the exec request lists them. */
enum { V_COMMAND, V_CONTAINERID, V_NETNS, V_IFNAME, V_ARGS, V_PATH, NVARS };
static const char *const var_names[NVARS] = {
	"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH",
};

struct shim {
	const char *var[NVARS];		/* NULL: not set */
	struct ustr val[NVARS];		/* as os.environ decodes them */
	const char *cmd;		/* ADD, CHECK or DEL once checked */
	uint8_t *in;
	size_t inlen;
	int in_too_big;
	struct jdoc doc;
	struct jspan top;
	int doc_ok;			/* valid JSON */
	int doc_obj;			/* ... and an object */

	/* filled by check_invocation() */
	struct ustr pod_name, pod_ns;	/* views into val[V_ARGS] */
	struct ustr sock;		/* "agentSocket" */
	struct ustr version;		/* "cniVersion" */
	double timeout;
	int fail_open;
	int has_prev;
	struct jspan prev;
};

/* cni_version_of(): the config's cniVersion if we speak it, for error answers. */
static const char *answer_version(struct shim *sh)
{
	struct jspan v;

	if (sh->doc_obj && j_get(&sh->doc, sh->top, "cniVersion", &v))
		for (size_t i = 0; i < sizeof(supported_versions) / sizeof(*supported_versions); i++)
			if (j_str_is(&sh->doc, v, supported_versions[i]))
				return supported_versions[i];
	return LATEST_VERSION;
}

static void log_line(const struct buf *msg)
{
	struct buf b = { 0 };

	puts_(&b, "ambit-cni: ");
	put(&b, cstr(msg), msg->len);
	putch(&b, '\n');
	write_all(2, b.p, b.len);
	free(b.p);
}

/* A CNI error object on stdout; exit status 1. */
static int print_error(struct shim *sh, int code, const struct buf *msg, const struct buf *details)
{
	struct buf out = { 0 };
	static const struct buf none = { 0 };

	putf(&out, "{\"cniVersion\": \"%s\", \"code\": %d, \"msg\": ", answer_version(sh), code);
	put_json_text(&out, msg);
	puts_(&out, ", \"details\": ");
	put_json_text(&out, details ? details : &none);
	puts_(&out, "}\n");
	write_all(1, out.p, out.len);
	free(out.p);
	return 1;
}

struct verr {
	int code;
	struct buf msg;
};

static int need_env(struct shim *sh, struct verr *e, int var, const char *what)
{
	e->code = ERR_INVALID_ENV;
	putf(&e->msg, "%s is not set: %s needs %s; the container runtime must set it (when "
	     "calling ambit-cni by hand, export it)", var_names[var], sh->cmd, what);
	return -1;
}

static int is_alnum(uint32_t c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"): "$" also matches before a final newline. */
static int valid_container_id(const struct ustr *u)
{
	size_t n = u->n;

	if (n >= 2 && u->cp[n - 1] == '\n')
		n--;
	if (!n || !is_alnum(u->cp[0]))
		return 0;
	for (size_t i = 1; i < n; i++)
		if (!is_alnum(u->cp[i]) && u->cp[i] != '_' && u->cp[i] != '.' && u->cp[i] != '-')
			return 0;
	return 1;
}

static int valid_ifname(const struct ustr *u)
{
	if (u->n > MAX_IFNAME || us_eq(u, ".") || us_eq(u, ".."))
		return 0;
	for (size_t i = 0; i < u->n; i++)
		if (u->cp[i] == '/' || u->cp[i] == ':' || py_isspace(u->cp[i]))
			return 0;
	return 1;
}

/* spec.parse_cni_args(), keeping only what messages need: the pod's name and namespace. */
static int check_cni_args(struct shim *sh, struct verr *e)
{
	const struct ustr *a = &sh->val[V_ARGS];
	size_t start = 0;

	for (size_t i = 0; i <= a->n; i++) {
		struct ustr part, key, stripped;
		size_t eq;

		if (i < a->n && a->cp[i] != ';')
			continue;
		part = us_slice(a, start, i);
		start = i + 1;
		stripped = us_strip(&part);
		if (!stripped.n)
			continue;
		for (eq = 0; eq < part.n && part.cp[eq] != '='; eq++)
			;
		key = us_slice(&part, 0, eq < part.n ? eq : part.n);
		key = us_strip(&key);
		if (eq == part.n || !key.n) {
			e->code = ERR_INVALID_ENV;
			puts_(&e->msg, "CNI_ARGS: ");
			put_repr(&e->msg, &part);
			puts_(&e->msg, " is not a KEY=VALUE pair; CNI_ARGS must look like "
			      "'K8S_POD_NAMESPACE=default;K8S_POD_NAME=web'");
			return -1;
		}
		if (us_eq(&key, "K8S_POD_NAME"))
			sh->pod_name = us_slice(&part, eq + 1, part.n);
		else if (us_eq(&key, "K8S_POD_NAMESPACE"))
			sh->pod_ns = us_slice(&part, eq + 1, part.n);
	}
	return 0;
}

static int bad_config(struct verr *e)
{
	e->code = ERR_INVALID_NETWORK_CONFIG;
	return -1;
}

/* spec._string(): a non-empty string; dflt when the key is absent (not when it is null). */
static int string_key(struct shim *sh, struct verr *e, const char *key, const char *dflt,
		      struct ustr *out)
{
	struct ustr u = { 0 };
	struct jspan v;
	int found = j_get(&sh->doc, sh->top, key, &v);

	if (!found && dflt) {
		for (const char *p = dflt; *p; p++)
			us_push(&u, (unsigned char)*p);
	} else if (found && j_type(&sh->doc, v) == J_STR) {
		u = j_str(&sh->doc, v);
	}
	if (u.n) {
		free(out->cp);
		*out = u;
		return 0;
	}
	free(u.cp);
	if (found && j_type(&sh->doc, v) != J_NULL) {
		putf(&e->msg, "network config: '%s' must be a non-empty string, got ", key);
		put_value(&e->msg, &sh->doc, v, 0, NULL, NULL);
		return bad_config(e);
	}
	putf(&e->msg, "network config: '%s' is missing; a CNI config needs \"cniVersion\", "
	     "\"name\" and \"type\" (the runtime injects name and cniVersion from the conflist)",
	     key);
	return bad_config(e);
}

/* spec.parse_netconf(), but for the addresses in prevResult. */
static int check_netconf(struct shim *sh, struct verr *e)
{
	struct ustr name = { 0 }, type = { 0 };
	struct jspan v;
	int supported = 0, rc;

	if (!sh->doc_ok) {
		puts_(&e->msg, "network config on stdin is not valid JSON (");
		put(&e->msg, cstr(&sh->doc.err), sh->doc.err.len);
		puts_(&e->msg, "); the runtime must pass the plugin's entry of the conflist as one "
		      "JSON object");
		return bad_config(e);
	}
	if (!sh->doc_obj) {
		putf(&e->msg, "network config on stdin must be a JSON object, got %s",
		     py_type(j_type(&sh->doc, sh->top)));
		return bad_config(e);
	}
	if (string_key(sh, e, "cniVersion", NULL, &sh->version))
		return -1;
	for (size_t i = 0; i < sizeof(supported_versions) / sizeof(*supported_versions); i++)
		supported |= us_eq(&sh->version, supported_versions[i]);
	if (!supported) {
		e->code = ERR_INCOMPATIBLE_VERSION;
		puts_(&e->msg, "cniVersion ");
		put_repr(&e->msg, &sh->version);
		puts_(&e->msg, " is not supported by ambit-cni (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0); set "
		      "\"cniVersion\": \"" LATEST_VERSION "\" in the conflist");
		return -1;
	}
	rc = string_key(sh, e, "name", NULL, &name) || string_key(sh, e, "type", NULL, &type);
	free(name.cp);
	free(type.cp);
	if (rc)
		return -1;
	if (string_key(sh, e, "agentSocket", DEFAULT_SOCKET, &sh->sock))
		return -1;
	if (sh->sock.cp[0] != '/') {
		puts_(&e->msg, "network config: \"agentSocket\" must be an absolute path, got ");
		put_repr(&e->msg, &sh->sock);
		puts_(&e->msg, "; the node agent listens on " DEFAULT_SOCKET " by default");
		return bad_config(e);
	}
	if (j_get(&sh->doc, sh->top, "timeoutSeconds", &v)) {
		enum jtype t = j_type(&sh->doc, v);
		double x = t == J_INT || t == J_FLOAT ? j_float(&sh->doc, v) : 0;

		if (!(x > 0)) { /* NaN too; a positive JSON integer is at least 1 */
			puts_(&e->msg, "network config: 'timeoutSeconds' must be a number of seconds "
			      "greater than 0, got ");
			put_value(&e->msg, &sh->doc, v, 0, NULL, NULL);
			puts_(&e->msg, "; e.g. \"timeoutSeconds\": 10");
			return bad_config(e);
		}
	}
	if (j_get(&sh->doc, sh->top, "failurePolicy", &v)) {
		if (j_str_is(&sh->doc, v, "fail-open")) {
			sh->fail_open = 1;
		} else if (!j_str_is(&sh->doc, v, "fail-closed")) {
			puts_(&e->msg, "network config: \"failurePolicy\" must be \"fail-closed\" or "
			      "\"fail-open\", got ");
			put_value(&e->msg, &sh->doc, v, 0, NULL, NULL);
			return bad_config(e);
		}
	}
	if (j_get(&sh->doc, sh->top, "prevResult", &v) && j_type(&sh->doc, v) != J_NULL) {
		if (j_type(&sh->doc, v) != J_OBJ) {
			putf(&e->msg, "network config: \"prevResult\" must be a JSON object (a CNI "
			     "result), got %s", py_type(j_type(&sh->doc, v)));
			return bad_config(e);
		}
		sh->has_prev = 1;
		sh->prev = v;
	}
	if (!sh->has_prev && strcmp(sh->cmd, "DEL")) {
		putf(&e->msg, "%s without \"prevResult\": ambit-cni is a chained plugin and does "
		     "not create interfaces; put it after the main plugin (e.g. ptp or bridge) in "
		     "the \"plugins\" list of a conflist", sh->cmd);
		return bad_config(e);
	}
	return 0;
}

/* spec.parse_invocation(), in its order, for a command that is ADD, CHECK or DEL. */
static int check_invocation(struct shim *sh, struct verr *e)
{
	if (!sh->val[V_CONTAINERID].n)
		return need_env(sh, e, V_CONTAINERID, "the container id");
	if (!valid_container_id(&sh->val[V_CONTAINERID])) {
		e->code = ERR_INVALID_ENV;
		puts_(&e->msg, "CNI_CONTAINERID=");
		put_repr(&e->msg, &sh->val[V_CONTAINERID]);
		puts_(&e->msg, " is not a valid container id: use letters, digits, '_', '.', '-', "
		      "starting with a letter or digit");
		return -1;
	}
	if (strcmp(sh->cmd, "DEL") && !sh->val[V_NETNS].n)
		return need_env(sh, e, V_NETNS, "the path of the pod's network namespace");
	if (!sh->val[V_IFNAME].n)
		return need_env(sh, e, V_IFNAME, "the pod's interface name (e.g. eth0)");
	if (!valid_ifname(&sh->val[V_IFNAME])) {
		e->code = ERR_INVALID_ENV;
		puts_(&e->msg, "CNI_IFNAME=");
		put_repr(&e->msg, &sh->val[V_IFNAME]);
		putf(&e->msg, " is not a valid interface name: at most %d characters, without "
		     "'/', ':' or whitespace, and not '.' or '..'", MAX_IFNAME);
		return -1;
	}
	if (check_cni_args(sh, e))
		return -1;
	return check_netconf(sh, e);
}

/* plugin._pod() */
static void put_pod(struct buf *b, struct shim *sh)
{
	if (sh->pod_name.n) {
		puts_(b, "pod ");
		if (sh->pod_ns.n)
			put_us(b, &sh->pod_ns);
		else
			putch(b, '?');
		putch(b, '/');
		put_us(b, &sh->pod_name);
		puts_(b, " (container ");
		put_us(b, &sh->val[V_CONTAINERID]);
		putch(b, ')');
	} else {
		puts_(b, "container ");
		put_us(b, &sh->val[V_CONTAINERID]);
	}
}

/* ---- asking the agent ----------------------------------------------------------------- */

enum ask { ASK_ANSWERED, ASK_UNAVAILABLE };

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Waits for fd to be ready until the deadline; 0 ready, -1 timed out (or poll failed). */
static int wait_fd(int fd, short events, double deadline)
{
	for (;;) {
		struct pollfd p = { fd, events, 0 };
		double left = deadline - now();
		int ms, rc;

		if (!(left > 0))
			return -1;
		ms = left * 1000 > MAX_POLL_MS ? MAX_POLL_MS : (int)(left * 1000) + 1;
		rc = poll(&p, 1, ms);
		if (rc > 0)
			return 0;
		if (rc < 0 && errno != EINTR)
			return -1;
	}
}

/* plugin.call_agent()'s reasons, word for word. */
static void reason_errno(struct buf *why, struct shim *sh, int err)
{
	if (err == ENOENT) {
		puts_(why, "the socket ");
		put_us(why, &sh->sock);
		puts_(why, " does not exist");
	} else if (err == ECONNREFUSED) {
		puts_(why, "nothing listens on ");
		put_us(why, &sh->sock);
		puts_(why, " (a socket left behind by an agent that exited)");
	} else if (err == ETIMEDOUT) {
		putf(why, "no answer within %gs", sh->timeout);
	} else {
		put_us(why, &sh->sock);
		putf(why, ": %s", strerror(err));
	}
}

/* One request, one answer line, all within the timeout: plugin.call_agent() in C. On
 * ASK_ANSWERED, *answer holds everything read (the line is up to its first newline). */
static enum ask ask_agent(struct shim *sh, const struct buf *req, struct buf *answer,
			  struct buf *why)
{
	double deadline = now() + sh->timeout;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct buf path = { 0 };
	size_t sent = 0;
	int fd = -1, err = 0;

	put_us_bytes(&path, &sh->sock);
	if (!(deadline - now() > 0)) {
		err = ETIMEDOUT;
		goto out;
	}
	if (path.len > sizeof(sa.sun_path)) {
		put_us(why, &sh->sock);
		puts_(why, ": AF_UNIX path too long");
		goto out;
	}
	memcpy(sa.sun_path, path.p, path.len);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		err = errno;
		goto out;
	}
	if (connect(fd, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path.len))) {
		socklen_t len = sizeof(err);

		if (errno != EINPROGRESS) {
			err = errno;
			goto out;
		}
		if (wait_fd(fd, POLLOUT, deadline)) {
			err = ETIMEDOUT;
			goto out;
		}
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len))
			err = errno;
		if (err)
			goto out;
	}
	while (sent < req->len) {
		ssize_t n = send(fd, req->p + sent, req->len - sent, MSG_NOSIGNAL);

		if (n > 0) {
			sent += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN) {
			err = errno;
			goto out;
		}
		if (wait_fd(fd, POLLOUT, deadline)) {
			err = ETIMEDOUT;
			goto out;
		}
	}
	while (!memchr(cstr(answer), '\n', answer->len) && answer->len <= MAX_ANSWER) {
		char chunk[65536];
		ssize_t n;

		if (wait_fd(fd, POLLIN, deadline)) {
			err = ETIMEDOUT;
			goto out;
		}
		n = recv(fd, chunk, sizeof(chunk), 0);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n < 0) {
			err = errno;
			goto out;
		}
		if (n == 0)
			break;
		put(answer, chunk, (size_t)n);
	}
	/* bytes.strip(): nothing but ASCII whitespace is no answer */
	for (size_t i = 0; i < answer->len; i++)
		if (!strchr(" \t\n\r\v\f", answer->p[i]) || !answer->p[i]) {
			close(fd);
			free(path.p);
			return ASK_ANSWERED;
		}
	puts_(why, "it closed the connection without answering");
out:
	if (err)
		reason_errno(why, sh, err);
	if (fd >= 0)
		close(fd);
	free(path.p);
	return ASK_UNAVAILABLE;
}

/* Relays a valid exec answer ({"exit": 0..255, "stdout": str, "stderr": str}); -1 if the
 * line is not one. */
static int relay_answer(const uint8_t *line, size_t len, int *exit_code)
{
	struct jdoc d = { 0 };
	struct jspan top, v;
	struct buf out = { 0 }, err = { 0 };
	struct ustr u;
	long code;
	int rc = -1;

	if (j_parse(&d, line, len, &top) || j_type(&d, top) != J_OBJ)
		goto done;
	if (!j_get(&d, top, "exit", &v) || j_type(&d, v) != J_INT || v.end - v.at > 3)
		goto done;
	code = strtol((const char *)d.s + v.at, NULL, 10);
	if (code < 0 || code > 255)
		goto done;
	if (!j_get(&d, top, "stdout", &v) || j_type(&d, v) != J_STR)
		goto done;
	u = j_str(&d, v);
	put_us_bytes(&out, &u);
	free(u.cp);
	if (j_get(&d, top, "stderr", &v)) {
		if (j_type(&d, v) != J_STR)
			goto done;
		u = j_str(&d, v);
		put_us_bytes(&err, &u);
		free(u.cp);
	}
	write_all(2, cstr(&err), err.len);
	write_all(1, cstr(&out), out.len);
	*exit_code = (int)code;
	rc = 0;
done:
	free(d.err.p);
	free(out.p);
	free(err.p);
	return rc;
}

/* spec.parse_agent_response()'s error for an answer that is not one. */
static void garbage_error(struct buf *msg, const uint8_t *line, size_t len)
{
	struct ustr u = { 0 }, text;

	us_decode(&u, line, len, DEC_REPLACE);
	text = us_strip(&u);
	if (text.n > 200)
		text.n = 200;
	puts_(msg, "the node agent answered ");
	put_repr(msg, &text);
	puts_(msg, ", which is not a response of the agent protocol ({\"ok\": true|false, ...}); "
	      "run an ambit-cni and a node agent of the same Ambit release");
	free(u.cp);
}

/* ---- without the agent: plugin.py's answers ------------------------------------------- */

enum why { WHY_LOCAL, WHY_UNAVAILABLE, WHY_GARBAGE };

/* The answer when the agent cannot give it: the invocation's own error if it has one,
 * else the failure policy applied to why the agent was not asked or did not answer. */
static int answer_alone(struct shim *sh, enum why kind, const struct buf *reason)
{
	struct verr e = { 0 };
	struct buf msg = { 0 }, details = { 0 }, summary = { 0 }, log = { 0 };
	int del = !strcmp(sh->cmd, "DEL"), add = !strcmp(sh->cmd, "ADD");

	if (check_invocation(sh, &e)) {
		if (del) {
			puts_(&log, "DEL: invalid input, nothing to tell the node agent: ");
			put(&log, cstr(&e.msg), e.msg.len);
			log_line(&log);
			return 0;
		}
		return print_error(sh, e.code, &e.msg, NULL);
	}
	if (kind == WHY_LOCAL) {
		/* unreachable: a config that passes the checks names a socket we can ask */
		puts_(&msg, "ambit-cni failed unexpectedly (no agent socket to ask); please report "
		      "it with the network config and this message");
		return del ? 0 : print_error(sh, ERR_INTERNAL, &msg, NULL);
	}
	if (kind == WHY_UNAVAILABLE) {
		e.code = ERR_TRY_AGAIN_LATER;
		puts_(&msg, "the Ambit node agent at ");
		put_us(&msg, &sh->sock);
		putf(&msg, " is not running or not answering (%s): ", cstr(reason));
		if (add) {
			put_pod(&msg, sh);
			puts_(&msg, " cannot be captured, so its sandbox fails (failurePolicy "
			      "fail-closed) and the kubelet retries it");
		} else {
			puts_(&msg, "the capture of ");
			put_pod(&msg, sh);
			puts_(&msg, " cannot be checked (failurePolicy fail-closed)");
		}
		puts_(&msg, ". Check the node agent on this node (its pod and log; `ls -l ");
		put_us(&msg, &sh->sock);
		puts_(&msg, "` shows whether it created its socket) and that \"agentSocket\" in "
		      "the CNI config is the socket it listens on");
		put(&details, cstr(reason), reason->len);
		puts_(&summary, "the node agent at ");
		put_us(&summary, &sh->sock);
		putf(&summary, " is unreachable (%s)", cstr(reason));
	} else {
		e.code = ERR_AGENT_PROTOCOL;
		garbage_error(&msg, (const uint8_t *)cstr(reason), reason->len);
		puts_(&summary, "the node agent at ");
		put_us(&summary, &sh->sock);
		putf(&summary, " gave an invalid answer (%s)", cstr(&msg));
	}
	if (del) {
		puts_(&log, "DEL of ");
		put_pod(&log, sh);
		puts_(&log, ": the node agent at ");
		put_us(&log, &sh->sock);
		putf(&log, " was not told (%s); it drops the pod when it reconciles",
		     kind == WHY_UNAVAILABLE ? cstr(reason) : cstr(&msg));
		log_line(&log);
		return 0;
	}
	if (!sh->fail_open)
		return print_error(sh, e.code, &msg, &details);
	putf(&log, "%s of ", sh->cmd);
	put_pod(&log, sh);
	putf(&log, ": %s; the pod %s (failurePolicy fail-open)", cstr(&summary),
	     add ? "starts WITHOUT capture" : "is reported healthy");
	log_line(&log);
	if (add) {
		/* dict(prevResult) with setdefault("cniVersion", the config's), as json.dumps */
		struct buf out = { 0 }, ver = { 0 };

		put_us(&ver, &sh->version);
		put_value(&out, &sh->doc, sh->prev, 1, "cniVersion", cstr(&ver));
		putch(&out, '\n');
		write_all(1, out.p, out.len);
	}
	return 0;
}

/* ---- main ----------------------------------------------------------------------------- */

static void read_stdin(struct shim *sh)
{
	struct buf b = { 0 };

	/* VERSION may be run by hand from a terminal; do not wait for input that never comes */
	if (isatty(0))
		return;
	for (;;) {
		char chunk[65536];
		ssize_t n = read(0, chunk, sizeof(chunk));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EBADF)
			break; /* no stdin at all: as Python's sys.stdin None */
		if (n < 0) {
			struct buf msg = { 0 };

			putf(&msg, "cannot talk to the container runtime: %s", strerror(errno));
			log_line(&msg);
			exit(1);
		}
		if (n == 0)
			break;
		if (b.len + (size_t)n > MAX_STDIN) {
			sh->in_too_big = 1;
			break;
		}
		put(&b, chunk, (size_t)n);
	}
	sh->in = (uint8_t *)b.p;
	sh->inlen = b.len;
}

/* {"op":"exec","env":{...},"stdin":"..."} and a newline */
static void build_request(struct shim *sh, struct buf *req)
{
	struct ustr in = { 0 };
	int first = 1;

	puts_(req, "{\"op\":\"exec\",\"env\":{");
	for (int i = 0; i < NVARS; i++) {
		if (!sh->var[i])
			continue;
		putf(req, "%s\"%s\":", first ? "" : ",", var_names[i]);
		put_json_us(req, &sh->val[i]);
		first = 0;
	}
	puts_(req, "},\"stdin\":");
	us_decode(&in, sh->in ? sh->in : (const uint8_t *)"", sh->inlen, DEC_ESCAPE);
	put_json_us(req, &in);
	puts_(req, "}\n");
	free(in.cp);
}

/* Where to forward: the config's agentSocket and timeoutSeconds, if they can be read at
 * all (whether the rest of the config is right is for the agent to say). */
static int find_agent(struct shim *sh)
{
	struct jspan v;

	sh->timeout = DEFAULT_TIMEOUT;
	if (!sh->doc_obj)
		return 0;
	if (j_get(&sh->doc, sh->top, "timeoutSeconds", &v)) {
		enum jtype t = j_type(&sh->doc, v);
		double x = t == J_INT || t == J_FLOAT ? j_float(&sh->doc, v) : 0;

		if (x > 0)
			sh->timeout = x;
	}
	if (!j_get(&sh->doc, sh->top, "agentSocket", &v)) {
		for (const char *p = DEFAULT_SOCKET; *p; p++)
			us_push(&sh->sock, (unsigned char)*p);
		return 1;
	}
	if (j_type(&sh->doc, v) != J_STR)
		return 0;
	sh->sock = j_str(&sh->doc, v);
	return sh->sock.n && sh->sock.cp[0] == '/';
}

int main(void)
{
	static const char *const commands[] = { "ADD", "DEL", "CHECK" };
	struct shim sh = { 0 };
	struct buf req = { 0 }, answer = { 0 }, why = { 0 };
	const char *cmd;
	int code;

	signal(SIGPIPE, SIG_IGN);
	for (int i = 0; i < NVARS; i++) {
		sh.var[i] = getenv(var_names[i]);
		if (sh.var[i])
			us_decode(&sh.val[i], (const uint8_t *)sh.var[i], strlen(sh.var[i]),
				  DEC_ESCAPE);
	}
	read_stdin(&sh);
	if (!sh.in_too_big) {
		sh.doc_ok = !j_parse(&sh.doc, sh.in ? sh.in : (const uint8_t *)"", sh.inlen, &sh.top);
		sh.doc_obj = sh.doc_ok && j_type(&sh.doc, sh.top) == J_OBJ;
	}

	cmd = sh.var[V_COMMAND];
	if (!cmd || !*cmd) {
		struct buf msg = { 0 };

		puts_(&msg, "CNI_COMMAND is not set: ambit-cni is a CNI plugin and must be run by a "
		      "container runtime (or with CNI_COMMAND=ADD|DEL|CHECK|VERSION and the CNI_* "
		      "variables set)");
		return print_error(&sh, ERR_INVALID_ENV, &msg, NULL);
	}
	if (!strcmp(cmd, "VERSION")) {
		static const char version[] = "{\"cniVersion\": \"" LATEST_VERSION "\", "
			"\"supportedVersions\": [\"0.3.0\", \"0.3.1\", \"0.4.0\", \"1.0.0\"]}\n";

		write_all(1, version, sizeof(version) - 1);
		return 0;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(*commands); i++)
		if (!strcmp(cmd, commands[i]))
			sh.cmd = commands[i];
	if (!sh.cmd) {
		struct buf msg = { 0 };

		puts_(&msg, "CNI_COMMAND=");
		put_repr(&msg, &sh.val[V_COMMAND]);
		puts_(&msg, " is not a CNI command; use one of ADD, DEL, CHECK, VERSION");
		return print_error(&sh, ERR_INVALID_ENV, &msg, NULL);
	}
	g_is_del = !strcmp(sh.cmd, "DEL");

	if (sh.in_too_big) {
		struct buf msg = { 0 };

		putf(&msg, "network config on stdin is larger than %u bytes, more than ambit-cni "
		     "reads; a CNI config is a few kilobytes", MAX_STDIN);
		if (g_is_del) {
			log_line(&msg);
			return 0;
		}
		return print_error(&sh, ERR_IO, &msg, NULL);
	}
	if (!find_agent(&sh))
		return answer_alone(&sh, WHY_LOCAL, NULL);
	build_request(&sh, &req);
	if (ask_agent(&sh, &req, &answer, &why) == ASK_UNAVAILABLE)
		return answer_alone(&sh, WHY_UNAVAILABLE, &why);
	{
		/* the answer is its first line (plugin.py reads no further) */
		const char *nl = memchr(answer.p, '\n', answer.len);
		size_t len = nl ? (size_t)(nl - answer.p) : answer.len;

		if (!relay_answer((const uint8_t *)answer.p, len, &code))
			return g_is_del ? 0 : code;
		answer.len = len;
		answer.p[len] = 0;
	}
	return answer_alone(&sh, WHY_GARBAGE, &answer);
}
