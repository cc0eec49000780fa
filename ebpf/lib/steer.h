/* Socket steering: hand a TCP packet to the local socket it belongs to, or a new connection to
 * a ztunnel listener, keeping its addresses (TPROXY semantics without iptables).
 *
 * bpf_sk_assign at tc ingress makes the stack deliver the packet to the given socket instead
 * of looking one up by the packet's (non-local) destination; the TPROXY mark then makes the
 * policy-routing rule route it locally, or the kernel would forward it. The accepted socket's
 * local address is the address the client dialled, which is how the ztunnel reads the original
 * destination (getsockname()).
 */
#ifndef AMBIT_STEER_H
#define AMBIT_STEER_H

#include "lib/counters.h"
#include "lib/maps.h"
#include "lib/parse.h"

static __always_inline void ambit_mark_local(struct __sk_buff *skb)
{
	skb->mark = (skb->mark & ~(__u32)AMBIT_MARK_MASK) | AMBIT_TPROXY_MARK;
}

/* Steer one TCP packet of enrolled pod `pod` (source for outbound, destination for inbound):
 *
 * 1. A socket that already exists on the node for the packet's 4-tuple gets it: the ztunnel's
 *    accepted side of a captured connection, its own upstream connections, a kubelet probe.
 *    Request sockets (TCP_NEW_SYN_RECV) included, which is why this is bpf_skc_lookup_tcp
 *    and not bpf_sk_lookup_tcp: without them the final ACK of a captured handshake would be
 *    routed away and the connection never established. Listening sockets are skipped: a
 *    listener that happens to match the destination (a node service on the same port) must
 *    not receive a pod's connection. A TIME_WAIT socket takes the segments of its old
 *    connection, but a new SYN for the same tuple goes to the listener like any new
 *    connection (TPROXY does the same).
 * 2. Otherwise, a new connection (SYN without ACK) goes to the listener in `slot`. If the slot
 *    is empty (the ztunnel is down) or the kernel refuses the socket, the SYN is dropped and
 *    counted as an error: capture fails closed, a captured pod's traffic never goes around the
 *    proxy. The client retransmits its SYN and gets through once a listener is back.
 * 3. Any other packet (a connection older than the pod's enrollment, a stray segment) is left
 *    alone.
 */
static __always_inline int ambit_steer(struct __sk_buff *skb, const struct ambit_pkt *pkt,
				       __u32 slot, __be32 pod)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	long err;

	tuple.ipv4.saddr = pkt->saddr;
	tuple.ipv4.daddr = pkt->daddr;
	tuple.ipv4.sport = pkt->sport;
	tuple.ipv4.dport = pkt->dport;

	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN &&
		    !(pkt->syn && sk->state == BPF_TCP_TIME_WAIT)) {
			/* A failed assign (the socket is being torn down) still leaves the mark:
			 * the stack's own lookup then finds the socket, or answers with a reset
			 * as it would for any closed connection. */
			bpf_sk_assign(skb, sk, 0);
			bpf_sk_release(sk);
			ambit_mark_local(skb);
			return TC_ACT_OK;
		}
		bpf_sk_release(sk);
	}

	if (!pkt->syn) {
		ambit_count(pod, AMBIT_PASSED);
		return TC_ACT_OK;
	}

	sk = (struct bpf_sock *)listeners.lookup(&slot);
	if (!sk) {
		ambit_count(pod, AMBIT_ERRORS);
		return TC_ACT_SHOT;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		ambit_count(pod, AMBIT_ERRORS);
		return TC_ACT_SHOT;
	}
	ambit_mark_local(skb);
	ambit_count(pod, AMBIT_CAPTURED);
	return TC_ACT_OK;
}

/* Inbound: HBONE (destination port 15008) to the HBONE listener, anything else plaintext. */
static __always_inline int ambit_steer_inbound(struct __sk_buff *skb,
					       const struct ambit_pkt *pkt)
{
	__u32 slot = AMBIT_SLOT_INBOUND_PLAINTEXT;

	if (!pkt->tcp) {
		ambit_count(pkt->daddr, AMBIT_PASSED);
		return TC_ACT_OK;
	}
	if (pkt->dport == bpf_htons(AMBIT_INBOUND_HBONE_PORT))
		slot = AMBIT_SLOT_INBOUND;
	return ambit_steer(skb, pkt, slot, pkt->daddr);
}

#endif /* AMBIT_STEER_H */
