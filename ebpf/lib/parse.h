/* Packet parsing: the few IPv4/TCP fields steering decides on.
 *
 * Only what capture needs is parsed: Ethernet (veths and the uplink are Ethernet devices),
 * IPv4 (capture is IPv4 only, as in agent/capture/base.py) and the TCP ports and flags. Every
 * bounds check is against data_end, so the verifier accepts each access.
 */
#ifndef AMBIT_PARSE_H
#define AMBIT_PARSE_H

#include "lib/common.h"

struct ambit_pkt {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* TCP only, else 0 */
	__be16 dport; /* TCP only, else 0 */
	__u8 tcp;     /* 1 if this is a TCP segment whose header we could read */
	__u8 syn;     /* SYN set and ACK clear: the first packet of a new connection */
	__u8 pad[2];
};

/* Fill `pkt` from an IPv4 packet. Returns 0 for IPv4 (TCP or not), -1 for anything else
 * (IPv6, ARP, truncated headers), which the callers pass untouched. A non-first IPv4 fragment
 * carries no TCP header, so it is reported as non-TCP rather than misread. */
static __always_inline int ambit_parse_ipv4(struct __sk_buff *skb, struct ambit_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct tcphdr *th;
	__u32 ihl;

	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return -1;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return -1;

	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->sport = 0;
	pkt->dport = 0;
	pkt->tcp = 0;
	pkt->syn = 0;

	if (ip->protocol != IPPROTO_TCP)
		return 0;
	/* Fragment offset non-zero: a later fragment, no TCP header in it. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;
	th = (void *)ip + ihl;
	if ((void *)(th + 1) > data_end)
		return 0;

	pkt->sport = th->source;
	pkt->dport = th->dest;
	pkt->tcp = 1;
	pkt->syn = th->syn && !th->ack;
	return 0;
}

#endif /* AMBIT_PARSE_H */
