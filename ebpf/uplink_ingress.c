/* tc ingress of the node's uplink(s): traffic from other nodes.
 *
 * A new TCP connection to an enrolled local pod goes to the ztunnel's inbound listeners
 * (15008 for HBONE, 15006 for plaintext). Everything else passes untouched: replies to the
 * node's own connections, traffic for pods that are not enrolled, and anything that is not
 * IPv4.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/steer.h"

int uplink_ingress(struct __sk_buff *skb)
{
	struct ambit_pkt pkt;

	if (ambit_parse_ipv4(skb, &pkt) < 0)
		return TC_ACT_OK;
	if (!pods.lookup(&pkt.daddr))
		return TC_ACT_OK;
	return ambit_steer_inbound(skb, &pkt);
}
