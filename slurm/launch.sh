# Sourced by the sdtune sbatch templates: run one srun step so that the batch script's USR1 (from
# `#SBATCH --signal=B:USR1@<s>`) reaches every task, and return the step's exit code.
#
# srun runs in the background because bash runs a trap only between commands: with srun in the
# foreground the USR1 would wait until training ended. srun forwards USR1 to all of its tasks; each
# task only sets a flag, and the ranks checkpoint together at the next step boundary, then rank 0
# requeues the job (`scontrol requeue`), which starts again with --resume auto.

sdtune_srun() {
    srun --kill-on-bad-exit=1 "$@" &
    local srun_pid=$!
    trap 'echo "sdtune: USR1: asking every task to checkpoint and stop"; kill -USR1 '"${srun_pid}" USR1
    local rc=0
    wait "${srun_pid}" || rc=$?
    while kill -0 "${srun_pid}" 2>/dev/null; do  # a trapped signal ends `wait` early: wait again
        rc=0
        wait "${srun_pid}" || rc=$?
    done
    trap - USR1
    return "${rc}"
}

sdtune_banner() {
    echo "sdtune: job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) on ${SLURM_JOB_NODELIST}:" \
        "${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE} task(s), restart ${SLURM_RESTART_COUNT:-0}"
}
