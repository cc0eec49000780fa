/* tc ingress of the host-side veth of every local pod, enrolled or not.
 *
 * Packets entering here come *from* a pod. If that pod is enrolled (its address is in `pods`
 * and the packet entered on its own veth), new TCP connections go to the ztunnel's outbound
 * listener, unless the destination is excluded. Otherwise, a packet *to* an enrolled pod (a
 * same-node pod calling it) is inbound, exactly as if it had come from another node; that is
 * why this program sits on every pod's veth, not only on enrolled ones.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/steer.h"

static __always_inline int ambit_excluded(__be32 daddr)
{
	struct ambit_lpm_key key = {.prefixlen = 32, .addr = daddr};

	return excluded.lookup(&key) != NULL;
}

int pod_ingress(struct __sk_buff *skb)
{
	struct ambit_pkt pkt;
	struct ambit_pod *src;

	if (ambit_parse_ipv4(skb, &pkt) < 0)
		return TC_ACT_OK;

	src = pods.lookup(&pkt.saddr);
	if (src && src->ifindex == skb->ingress_ifindex) {
		if (!pkt.tcp || ambit_excluded(pkt.daddr)) {
			ambit_count(pkt.saddr, AMBIT_PASSED);
			return TC_ACT_OK;
		}
		return ambit_steer(skb, &pkt, AMBIT_SLOT_OUTBOUND, pkt.saddr);
	}

	if (pods.lookup(&pkt.daddr))
		return ambit_steer_inbound(skb, &pkt);
	return TC_ACT_OK;
}
