/* Per-pod counters (map `stats`), exported by the agent as ambit_capture_*_total{pod=...}.
 *
 * Only enrolled pods are counted, keyed by the pod's address: the source of its outbound
 * packets, the destination of its inbound ones.
 */
#ifndef AMBIT_COUNTERS_H
#define AMBIT_COUNTERS_H

#include "lib/maps.h"

enum ambit_counter {
	AMBIT_CAPTURED,
	AMBIT_PASSED,
	AMBIT_ERRORS,
};

static __always_inline void ambit_count(__be32 pod, enum ambit_counter which)
{
	struct ambit_counters zero = {};
	struct ambit_counters *c;

	/* The entry appears with the pod's first counted packet; if the map is full the packet
	 * is still handled, only not counted. The value is this CPU's copy: no atomics needed. */
	c = stats.lookup_or_try_init(&pod, &zero);
	if (!c)
		return;
	switch (which) {
	case AMBIT_CAPTURED:
		c->captured++;
		break;
	case AMBIT_PASSED:
		c->passed++;
		break;
	case AMBIT_ERRORS:
		c->errors++;
		break;
	}
}

#endif /* AMBIT_COUNTERS_H */
