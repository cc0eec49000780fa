/* Shared includes, constants and map value layouts for every Ambit eBPF program.
 *
 * Why it exists: the C side and the Python side (agent/capture/ebpf_*.py) must agree on every
 * number (marks, ports, listener slots) and every struct layout (map keys and values). The
 * agent passes the numbers with -D when it compiles, so agent/capture/iptables.py and
 * agent/capture/base.py stay their single source of truth; the defaults below only serve a
 * build without the agent and are checked against the Python constants by a unit test.
 *
 * Only stable UAPI headers are included: bcc compiles against whatever kernel headers the node
 * ships (Debian's 6.1 headers on a 6.18 kernel, for one), so nothing from include/linux.
 */
#ifndef AMBIT_COMMON_H
#define AMBIT_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>

/* The mark that makes the policy-routing rule (fwmark MARK/MASK lookup TABLE, "local
 * 0.0.0.0/0 dev lo" in that table) deliver a steered packet locally although its destination
 * is not a node address. Same mark and mask as the iptables backend's TPROXY rules. */
#ifndef AMBIT_TPROXY_MARK
#define AMBIT_TPROXY_MARK 0x111
#endif
#ifndef AMBIT_MARK_MASK
#define AMBIT_MARK_MASK 0xfff
#endif

/* Destination port that makes an inbound connection HBONE (mTLS tunnel) rather than
 * plaintext. */
#ifndef AMBIT_INBOUND_HBONE_PORT
#define AMBIT_INBOUND_HBONE_PORT 15008
#endif

/* Slots of the listener SOCKMAP (agent/capture/base.py LISTENER_SLOTS). */
#ifndef AMBIT_SLOT_OUTBOUND
#define AMBIT_SLOT_OUTBOUND 0
#endif
#ifndef AMBIT_SLOT_INBOUND
#define AMBIT_SLOT_INBOUND 1
#endif
#ifndef AMBIT_SLOT_INBOUND_PLAINTEXT
#define AMBIT_SLOT_INBOUND_PLAINTEXT 2
#endif
#define AMBIT_LISTENER_SLOTS 3

/* Map sizes. A node runs at most a few hundred pods; the agent refuses to enroll more. */
#ifndef AMBIT_MAX_PODS
#define AMBIT_MAX_PODS 4096
#endif
#ifndef AMBIT_MAX_EXCLUDED
#define AMBIT_MAX_EXCLUDED 256
#endif

/* Value of the `pods` map, keyed by the pod's IPv4 address in network byte order. */
struct ambit_pod {
	/* The pod's host-side veth: only packets entering there count as the pod's outbound,
	 * as with the iptables backend's `-i veth`, so another pod cannot have its traffic
	 * attributed to this one by spoofing the source address. */
	__u32 ifindex;
	__u32 flags; /* AMBIT_POD_* */
};

#define AMBIT_POD_ENROLLED 0x1

/* Value of the per-CPU `stats` map, keyed like `pods`. */
struct ambit_counters {
	__u64 captured; /* new connections steered into a ztunnel listener */
	__u64 passed;   /* packets seen and deliberately left alone */
	__u64 errors;   /* new connections dropped because they could not be steered */
};

/* Key of the `excluded` LPM trie: prefix length in host order, then the address in network
 * order, as BPF_MAP_TYPE_LPM_TRIE requires (struct bpf_lpm_trie_key). */
struct ambit_lpm_key {
	__u32 prefixlen;
	__u32 addr;
};

#endif /* AMBIT_COMMON_H */
