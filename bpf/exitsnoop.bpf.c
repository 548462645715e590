// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * exitsnoop: record the exit status of registered processes.
 *
 * Attached to the sched_process_exit raw tracepoint (fires in do_exit() of
 * every exiting *thread*, in the context of that thread).  User space puts
 * the host tgid of a process it wants to watch into `tracked`; when the last
 * thread of that thread group exits, the program writes the group's wait(2)
 * status into `exits` (keyed by the caller's trace id, the source of truth),
 * pushes the trace id into the `exit_ring` ring buffer to wake the daemon and
 * removes the `tracked` entry.
 *
 * CO-RE without vmlinux.h: the few kernel fields read are declared below with
 * preserve_access_index, libbpf relocates them against the running kernel's
 * BTF.  Every dereference goes through BPF_CORE_READ, so the same handler is
 * valid as raw_tp (used) and tp_btf.
 *
 * Layout version: any change to a map's type, key, value or size must bump
 * EXITSNOOP_LAYOUT_VERSION (and LAYOUT_VERSION in shim/exits/exittrack.py).  Pins
 * live under <pin root>/v<N>/, and the program name carries N, so an old
 * layout is never reused by mistake.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "exit_status.h"

#define EXITSNOOP_LAYOUT_VERSION 1

/* ---- shadow kernel types (only the fields we read) ---------------------- */
#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct task_struct {
	int exit_code;
	int pid;
	int tgid;
	__u64 start_boottime;
	struct task_struct *group_leader;
	struct signal_struct *signal;
};
#pragma clang attribute pop


/*
 * Start time unit shared with user space: boot-clock nanoseconds truncated to
 * USER_HZ (100 Hz) ticks, i.e. what /proc/<pid>/stat field 22 says, times
 * 10 ms.  /proc computes nsec_to_clock_t(start_boottime) = ns / 10_000_000
 * (truncating), so (ns / TICK_NS) * TICK_NS is exactly ticks * TICK_NS.
 */
#define TICK_NS 10000000ULL

#define MAX_TRACKED 16384
#define MAX_EXITS 16384

struct tracked_val {
	__u64 trace_id;
	__u64 start_boottime; /* ns, truncated to TICK_NS */
};

struct exit_rec {
	__u32 pid;
	__s32 exit_code;      /* wait(2) status word: code << 8 | signal | 0x80 core */
	__u64 start_boottime; /* ns, truncated to TICK_NS */
	__u64 exited_at;      /* bpf_ktime_get_boot_ns() */
};

enum stat_idx {
	STAT_RECORDED = 0,    /* record written to `exits` */
	STAT_EXITS_FULL = 1,  /* `exits` update failed (full): tracked entry kept */
	STAT_RING_DROP = 2,   /* ring buffer full: notification lost (record kept) */
	STAT_STALE = 3,       /* tracked pid reused by another process: entry dropped */
	STAT_DUPLICATE = 4,   /* a record for this trace id already existed */
	STAT_MAX = 8,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_TRACKED);
	__type(key, __u32); /* host tgid */
	__type(value, struct tracked_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tracked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_EXITS);
	__type(key, __u64); /* trace id */
	__type(value, struct exit_rec);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} exits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024); /* 4096 pending ids (8 B + 8 B header); power of 2, page multiple */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} exit_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

static __always_inline void bump(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

/* The program name carries the layout version (max 15 chars). */
SEC("raw_tp/sched_process_exit")
int exitsnoop_v1(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct task_struct *leader;
	struct signal_struct *sig;
	struct tracked_val *tv;
	struct exit_rec rec = {};
	__u64 trace_id, start;
	__u32 tgid;
	long err;

	tgid = (__u32)BPF_CORE_READ(task, tgid);
	tv = bpf_map_lookup_elem(&tracked, &tgid);
	if (!tv)
		return 0;

	/* Two last threads racing: the BPF_NOEXIST insert below lets one win. */
	sig = BPF_CORE_READ(task, signal);
	if (!LAST_THREAD(sig))
		return 0;

	leader = BPF_CORE_READ(task, group_leader);
	start = BPF_CORE_READ(leader, start_boottime);
	start = (start / TICK_NS) * TICK_NS;
	trace_id = tv->trace_id;
	if (tv->start_boottime != start) {
		/* The registered process is long gone and its pid was reused. */
		bpf_map_delete_elem(&tracked, &tgid);
		bump(STAT_STALE);
		return 0;
	}

	rec.exit_code = EXIT_STATUS_WORD(sig, leader);
	rec.pid = tgid;
	rec.start_boottime = start;
	rec.exited_at = bpf_ktime_get_boot_ns();

	err = bpf_map_update_elem(&exits, &trace_id, &rec, BPF_NOEXIST);
	if (err == -17 /* EEXIST */) {
		bpf_map_delete_elem(&tracked, &tgid);
		bump(STAT_DUPLICATE);
		return 0;
	}
	if (err) {
		/* Keep `tracked` so user space sees an entry without a record. */
		bump(STAT_EXITS_FULL);
		return 0;
	}
	bpf_map_delete_elem(&tracked, &tgid);
	bump(STAT_RECORDED);
	if (bpf_ringbuf_output(&exit_ring, &trace_id, sizeof(trace_id), 0))
		bump(STAT_RING_DROP);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
