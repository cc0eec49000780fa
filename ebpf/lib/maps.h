/* The pinned maps every program shares.
 *
 * Why pinned: the maps hold the node's capture state (which pods are enrolled, the ztunnel's
 * listening sockets, the counters, the exclusions). Pinned under AMBIT_PIN_DIR on bpffs, they
 * outlive the agent process: a restarted or upgraded agent reopens the same maps and replaces
 * the programs on their tc hooks in place, so traffic is never left uncaptured (or dropped)
 * while the agent is away. bcc's BPF_TABLE_PINNED opens a pinned map if it exists and else
 * creates and pins it, so the first program compiled creates them and the others share them.
 *
 * The agent defines AMBIT_PIN_DIR (a C string literal) on the compiler command line.
 */
#ifndef AMBIT_MAPS_H
#define AMBIT_MAPS_H

#include "lib/common.h"

#ifndef AMBIT_PIN_DIR
#error "AMBIT_PIN_DIR must be defined (-DAMBIT_PIN_DIR=\"/sys/fs/bpf/ambit\")"
#endif

/* Enrolled pods: IPv4 (network order) -> struct ambit_pod. Written by the agent only. */
BPF_TABLE_PINNED("hash", __u32, struct ambit_pod, pods, AMBIT_MAX_PODS,
		 AMBIT_PIN_DIR "/pods");

/* The ztunnel's listening sockets, by slot. A SOCKMAP rather than a port number: steering
 * with bpf_sk_assign needs the socket itself, and the kernel drops a socket from the map when
 * it closes, so a stopped ztunnel leaves an empty slot (and capture fails closed) instead of a
 * stale reference. Declared with BPF_TABLE, not bcc's BPF_SOCKMAP, because only BPF_TABLE
 * gives a `lookup` that returns the referenced socket; the value is 8 bytes so that user space
 * can read a slot back (as the socket cookie) for `ambit agent status`. */
BPF_TABLE_PINNED("sockmap", __u32, __u64, listeners, AMBIT_LISTENER_SLOTS,
		 AMBIT_PIN_DIR "/listeners");

/* Per-pod counters: IPv4 (network order) -> struct ambit_counters, one copy per CPU so the
 * data path never contends on a shared cache line; the agent sums the copies. */
BPF_TABLE_PINNED("percpu_hash", __u32, struct ambit_counters, stats, AMBIT_MAX_PODS,
		 AMBIT_PIN_DIR "/stats");

/* Destinations an enrolled pod reaches directly, never through the ztunnel (for instance the
 * API server's CIDR). Longest-prefix match on the destination address. */
BPF_TABLE_PINNED("lpm_trie", struct ambit_lpm_key, __u8, excluded, AMBIT_MAX_EXCLUDED,
		 AMBIT_PIN_DIR "/excluded", BPF_F_NO_PREALLOC);

#endif /* AMBIT_MAPS_H */
