/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What exitsnoop.bpf.c and watch.bpf.c both read at sched_process_exit: whether the exiting
 * thread is the last of its process, and the process's wait(2) status word.  Include after
 * vmlinux-free headers (bpf_core_read.h); the includer's shadow task_struct must have
 * exit_code and signal.
 */
#ifndef EMBEDSHIM_EXIT_STATUS_H
#define EMBEDSHIM_EXIT_STATUS_H

/* ---- shadow kernel types (only the fields we read) ---------------------- */
#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)
typedef struct {
	int counter;
} atomic_t;

struct signal_struct {
	atomic_t live;
	int group_exit_code;
	unsigned int flags;
};
#pragma clang attribute pop

/* include/linux/sched/signal.h; unchanged since 2.6 */
#define SIGNAL_GROUP_EXIT 0x00000004

/*
 * do_exit() decrements signal->live before this tracepoint fires, so 0 means the whole
 * thread group is gone (the leader may have exited earlier and be a zombie waiting for the
 * group).  Two threads racing can both observe 0.
 */
#define LAST_THREAD(sig) (BPF_CORE_READ(sig, live.counter) == 0)

/* The wait(2) status word of the process led by `leader`: the same rule as wait_task_zombie(). */
#define EXIT_STATUS_WORD(sig, leader)                                    \
	((BPF_CORE_READ(sig, flags) & SIGNAL_GROUP_EXIT) ?               \
		 BPF_CORE_READ(sig, group_exit_code) :                    \
		 BPF_CORE_READ(leader, exit_code))

#endif
