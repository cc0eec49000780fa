/*
 * libFuzzer target for the C CNI host binary (agent/cni/shim/ambit-cni.c), built with clang
 * -fsanitize=fuzzer,address,undefined by fuzz/run.py. The shim's source is included whole with
 * its main() renamed, so its static parsing functions are fuzzed as the binary compiles them.
 *
 * Input: byte 0 is a mode (bit 0: the agent is unreachable, else it answered); then seven
 * NUL-separated fields: CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH
 * (empty: unset), the agent's answer line; the rest is stdin (the network config). Python's
 * target fuzz/cni_request.py reads the same layout.
 *
 * What runs is main() without the socket: decode the variables (surrogateescape), parse stdin
 * as Python's json does, check the command, find the agent socket, build the exec request,
 * then relay the answer if it is a valid exec answer, else apply the failure policy (with the
 * invocation checks and the fail-open prevResult pass-through). Stdout and stderr are closed
 * by the runner (-close_fd_mask=3).
 *
 * Checked: AddressSanitizer (out-of-bounds reads and writes, use after free, double free) and
 * UndefinedBehaviorSanitizer; nothing is an "allowed" exception in C: any report is a finding.
 * The shim frees little (it is a short-lived process), so allocations are tracked per input
 * and released after it: leaks are not findings, growth across inputs would be noise.
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- per-input allocation tracking ---------------------------------------------------- */

#define FUZZ_MAGIC 0xA5B1C0DEu

struct fuzz_hdr {
	struct fuzz_hdr *prev, *next;
	size_t magic;
	size_t pad; /* keeps user memory 16-byte aligned */
};

static struct fuzz_hdr fuzz_live = { &fuzz_live, &fuzz_live, 0, 0 };

static void fuzz_link(struct fuzz_hdr *h)
{
	h->magic = FUZZ_MAGIC;
	h->next = fuzz_live.next;
	h->prev = &fuzz_live;
	fuzz_live.next->prev = h;
	fuzz_live.next = h;
}

static void fuzz_unlink(struct fuzz_hdr *h)
{
	h->prev->next = h->next;
	h->next->prev = h->prev;
}

static struct fuzz_hdr *fuzz_hdr_of(void *p)
{
	struct fuzz_hdr *h = (struct fuzz_hdr *)p - 1;

	if (h->magic != FUZZ_MAGIC)
		free(p); /* not ours: let AddressSanitizer report the bad free */
	return h;
}

static void *fuzz_malloc(size_t n)
{
	struct fuzz_hdr *h = malloc(sizeof(*h) + n);

	if (!h)
		return NULL;
	fuzz_link(h);
	return h + 1;
}

static void *fuzz_realloc(void *p, size_t n)
{
	struct fuzz_hdr *h;

	if (!p)
		return fuzz_malloc(n);
	h = fuzz_hdr_of(p);
	fuzz_unlink(h);
	h->magic = 0;
	h = realloc(h, sizeof(*h) + n);
	if (!h)
		return NULL;
	fuzz_link(h);
	return h + 1;
}

static void fuzz_free(void *p)
{
	struct fuzz_hdr *h;

	if (!p)
		return;
	h = fuzz_hdr_of(p);
	fuzz_unlink(h);
	h->magic = 0;
	free(h);
}

static void fuzz_free_all(void)
{
	while (fuzz_live.next != &fuzz_live) {
		struct fuzz_hdr *h = fuzz_live.next;

		fuzz_unlink(h);
		h->magic = 0;
		free(h);
	}
}

#define malloc fuzz_malloc
#define realloc fuzz_realloc
#define free fuzz_free
#define main ambit_cni_main
#include "../agent/cni/shim/ambit-cni.c"
#undef main

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_one(const uint8_t *data, size_t size)
{
	static const char *const commands[] = { "ADD", "DEL", "CHECK" };
	struct shim sh = { 0 };
	struct buf req = { 0 }, answer = { 0 }, why = { 0 };
	const uint8_t *ans;
	size_t pos = 1, ans_len;
	int mode, code;

	if (!size)
		return;
	mode = data[0];
	for (int i = 0; i <= NVARS; i++) {
		const uint8_t *nul = pos < size ? memchr(data + pos, 0, size - pos) : NULL;
		size_t end = nul ? (size_t)(nul - data) : size;

		if (i == NVARS) {
			ans = data + pos;
			ans_len = end - pos;
		} else if (end > pos) {
			char *v = malloc(end - pos + 1);

			memcpy(v, data + pos, end - pos);
			v[end - pos] = 0;
			sh.var[i] = v;
			us_decode(&sh.val[i], (const uint8_t *)v, end - pos, DEC_ESCAPE);
		}
		pos = nul ? end + 1 : size;
	}
	/* stdin in a buffer of its exact size, so reading past it is caught */
	sh.inlen = size - pos;
	if (sh.inlen > MAX_STDIN) {
		sh.in_too_big = 1;
	} else {
		sh.in = malloc(sh.inlen ? sh.inlen : 1);
		memcpy(sh.in, data + pos, sh.inlen);
		sh.doc_ok = !j_parse(&sh.doc, sh.in, sh.inlen, &sh.top);
		sh.doc_obj = sh.doc_ok && j_type(&sh.doc, sh.top) == J_OBJ;
	}
	if (!sh.var[V_COMMAND]) {
		struct buf msg = { 0 };

		puts_(&msg, "CNI_COMMAND is not set");
		print_error(&sh, ERR_INVALID_ENV, &msg, NULL);
		return;
	}
	if (!strcmp(sh.var[V_COMMAND], "VERSION"))
		return;
	for (size_t i = 0; i < sizeof(commands) / sizeof(*commands); i++)
		if (!strcmp(sh.var[V_COMMAND], commands[i]))
			sh.cmd = commands[i];
	if (!sh.cmd) {
		struct buf msg = { 0 };

		put_repr(&msg, &sh.val[V_COMMAND]);
		print_error(&sh, ERR_INVALID_ENV, &msg, NULL);
		return;
	}
	g_is_del = !strcmp(sh.cmd, "DEL");
	if (sh.in_too_big)
		return;
	if (!find_agent(&sh)) {
		answer_alone(&sh, WHY_LOCAL, NULL);
		return;
	}
	build_request(&sh, &req);
	if (mode & 1) {
		puts_(&why, "connection refused");
		answer_alone(&sh, WHY_UNAVAILABLE, &why);
		return;
	}
	/* the answer line in a buffer of its exact size, as main() cuts it at the newline */
	{
		uint8_t *line = malloc(ans_len ? ans_len : 1);
		const char *nl;

		memcpy(line, ans, ans_len);
		nl = memchr(line, '\n', ans_len);
		ans_len = nl ? (size_t)(nl - (const char *)line) : ans_len;
		if (!relay_answer(line, ans_len, &code))
			return;
		put(&answer, line, ans_len);
	}
	answer_alone(&sh, WHY_GARBAGE, &answer);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_one(data, size);
	fuzz_free_all();
	g_is_del = 0;
	return 0;
}
