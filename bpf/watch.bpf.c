// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * watch: the lifecycle of every process inside our containers (exec, exit, OOM kill).
 *
 * A separate object from exitsnoop (its own pins under <pin root>/watch-v<N>/), so the
 * exit tracker's pinned layout never changes for it.
 *
 * Attribution: a container is its cgroup on the unified (v2) hierarchy.  runc puts every
 * container there, on a pure v2 host and on a hybrid one (v1 controllers plus v2 at
 * /sys/fs/cgroup/unified) alike, so bpf_get_current_cgroup_id() (the kernfs id of the
 * current task's cgroup on the default hierarchy, i.e. the inode number of the cgroup's
 * directory there) names the container.  The daemon fills `containers` with the ids of
 * the containers it serves; every other process on the node costs one hash lookup.
 *
 * Per event in one of our containers: the counters in the container's map value (always),
 * and, only while `config.watching` is set (a watcher is connected, or the daemon keeps
 * the stream across its reload), one ring buffer record.  A record that does not fit is
 * counted in `drops`.
 *
 * Layout version: any change to a map's type, key, value or size, to struct event, or to
 * the programs' names must bump WATCH_LAYOUT_VERSION (and LAYOUT_VERSION in shim/watch/probe.py).
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "exit_status.h"

#define WATCH_LAYOUT_VERSION 1

/* ---- shadow kernel types (only the fields we read) ---------------------- */
#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct kernfs_node {
	__u64 id;
};

struct cgroup {
	struct kernfs_node *kn;
};

struct css_set {
	struct cgroup *dfl_cgrp;
};

struct task_struct {
	int exit_code;
	int pid;
	int tgid;
	char comm[16];
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct signal_struct *signal;
	struct css_set *cgroups;
};

struct linux_binprm {
	const char *filename;
};
#pragma clang attribute pop


#define MAX_CONTAINERS 4096
#define FILENAME_LEN 256

enum event_type {
	EV_EXEC = 1,
	EV_EXIT = 2,
	EV_OOM = 3,
};

/* One record in the ring; exec records carry the filename, the others stop before it. */
struct event {
	__u64 ktime;   /* bpf_ktime_get_boot_ns() */
	__u64 cgid;    /* the container's cgroup id (key of `containers`) */
	__u32 type;    /* enum event_type */
	__u32 pid;     /* tgid (exit/exec), victim tgid (oom) */
	__u32 ppid;    /* real parent's tgid */
	__s32 status;  /* exit: wait(2) status word; exec, oom: 0 */
	char comm[16]; /* exec: the new comm; exit: the leader's; oom: the victim's */
	char filename[FILENAME_LEN];
};

#define EVENT_HEAD (sizeof(struct event) - FILENAME_LEN)

/* Counters per container, in the value the daemon inserted (zeroed). */
struct container {
	__u64 execs;
	__u64 exits;
	__u64 signaled;   /* exits by a signal */
	__u64 core_dumps;
	__u64 oom_kills;
	__u64 reserved[3];
};

struct config {
	__u32 watching; /* 1: records go to the ring */
	__u32 reserved;
};

enum stat_idx {
	STAT_EVENTS = 0,  /* records written */
	STAT_DROPS = 1,   /* records lost: ring full */
	STAT_MAX = 4,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CONTAINERS);
	__type(key, __u64); /* cgroup id on the unified hierarchy */
	__type(value, struct container);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} containers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 1024 * 1024); /* ~50k exits or ~13k execs: a daemon reload's worth */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} wstats SEC(".maps");

static __always_inline void bump(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&wstats, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline int watching(void)
{
	__u32 zero = 0;
	struct config *c = bpf_map_lookup_elem(&config, &zero);

	return c && c->watching;
}

static __always_inline void emit(struct event *ev, __u32 size)
{
	if (size > sizeof(*ev))
		size = sizeof(*ev);
	if (bpf_ringbuf_output(&events, ev, size, 0))
		bump(STAT_DROPS);
	else
		bump(STAT_EVENTS);
}

SEC("raw_tp/sched_process_exec")
int watch_exec_v1(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	struct container *c = bpf_map_lookup_elem(&containers, &cgid);
	struct task_struct *task, *parent;
	struct linux_binprm *bprm;
	struct event ev = {};
	const char *fn;
	long n;

	if (!c)
		return 0;
	__sync_fetch_and_add(&c->execs, 1);
	if (!watching())
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	parent = BPF_CORE_READ(task, real_parent);
	bprm = (struct linux_binprm *)ctx->args[2];
	fn = BPF_CORE_READ(bprm, filename);
	ev.ktime = bpf_ktime_get_boot_ns();
	ev.cgid = cgid;
	ev.type = EV_EXEC;
	ev.pid = BPF_CORE_READ(task, tgid);
	ev.ppid = BPF_CORE_READ(parent, tgid);
	bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	n = bpf_probe_read_kernel_str(ev.filename, sizeof(ev.filename), fn);
	if (n < 0)
		n = 0;
	emit(&ev, EVENT_HEAD + (__u32)n);
	return 0;
}

SEC("raw_tp/sched_process_exit")
int watch_exit_v1(void *ctx)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	struct container *c = bpf_map_lookup_elem(&containers, &cgid);
	struct task_struct *task, *leader, *parent;
	struct signal_struct *sig;
	struct event ev = {};
	int status;

	if (!c)
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	/* One event per process: when its last thread exits (LAST_THREAD, exit_status.h). */
	sig = BPF_CORE_READ(task, signal);
	if (!LAST_THREAD(sig))
		return 0;
	leader = BPF_CORE_READ(task, group_leader);
	status = EXIT_STATUS_WORD(sig, leader);
	__sync_fetch_and_add(&c->exits, 1);
	if (status & 0x7f)
		__sync_fetch_and_add(&c->signaled, 1);
	if (status & 0x80)
		__sync_fetch_and_add(&c->core_dumps, 1);
	if (!watching())
		return 0;
	parent = BPF_CORE_READ(leader, real_parent);
	ev.ktime = bpf_ktime_get_boot_ns();
	ev.cgid = cgid;
	ev.type = EV_EXIT;
	ev.pid = BPF_CORE_READ(task, tgid);
	ev.ppid = BPF_CORE_READ(parent, tgid);
	ev.status = status;
	BPF_CORE_READ_STR_INTO(&ev.comm, leader, comm);
	emit(&ev, EVENT_HEAD);
	return 0;
}

/* mark_victim(struct task_struct *task, ...): fires in the killer's context, so the
 * container is the victim's cgroup, not the current one. */
SEC("raw_tp/mark_victim")
int watch_oom_v1(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *victim = (struct task_struct *)ctx->args[0];
	struct task_struct *parent;
	struct container *c;
	struct event ev = {};
	__u64 cgid;

	cgid = BPF_CORE_READ(victim, cgroups, dfl_cgrp, kn, id);
	c = bpf_map_lookup_elem(&containers, &cgid);
	if (!c)
		return 0;
	__sync_fetch_and_add(&c->oom_kills, 1);
	if (!watching())
		return 0;
	parent = BPF_CORE_READ(victim, real_parent);
	ev.ktime = bpf_ktime_get_boot_ns();
	ev.cgid = cgid;
	ev.type = EV_OOM;
	ev.pid = BPF_CORE_READ(victim, tgid);
	ev.ppid = BPF_CORE_READ(parent, tgid);
	BPF_CORE_READ_STR_INTO(&ev.comm, victim, comm);
	emit(&ev, EVENT_HEAD);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
