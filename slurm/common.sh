# shellcheck shell=bash
# The logic every job script of slurm/ shares: layout, rendezvous, environment, the training
# and replica srun steps, signal forwarding and requeue. A job script finds the checkout
# (AGPO_ROOT, see agpo_tiny.sh), sets its defaults (the variables below) and its Hydra
# overrides (JOB_OVERRIDES), then:
#
#   source "$AGPO_ROOT/slurm/common.sh"
#   agpo_main "$@"
#
# Every variable can be set in the environment of `sbatch` (it is exported to the job by
# default) or on its command line: `RUN_DIR=/scratch/run1 sbatch slurm/agpo_70b.sh
# trainer.steps=500`. Arguments to the job script are Hydra overrides, after the script's own
# (the last value of a key wins); `--dry-run` (or DRY_RUN=1) prints the layout and the
# commands and launches nothing, also outside an allocation (then the node list is made up
# from the script's #SBATCH --nodes).
#
#   RUN_DIR           the run directory (checkpoints, metrics, logs); default
#                     runs/<job name>-<job id>, stable across requeues of the job
#   TRAIN_NODES       nodes of the training step (default: all nodes but ROLLOUT_NODES)
#   ROLLOUT_NODES     nodes that only run vLLM replicas as their own srun steps (default 0)
#   TASKS_PER_NODE    training ranks per node (default GPUS_PER_NODE, or the allocation's)
#   GPUS_PER_NODE     GPUs per node (0 on a CPU cluster)
#   ROLLOUT_LAUNCH    external (replicas are srun steps that connect to the trainer) or spawn
#                     (the trainer's rank 0 starts them as its own subprocesses)
#   NUM_REPLICAS      replica steps (external) or processes (spawn)
#   ROLLOUT_TP        GPUs per replica (vLLM tensor parallelism)
#   MASTER_ADDR/PORT  torch.distributed rendezvous (default: first node, port from the job id)
#   ROLLOUT_BIND_HOST address the trainer listens on for replicas (default: MASTER_ADDR's IP)
#   SRUN_ARGS         extra arguments for every srun (containers: --container-image=...)
#   PYTHON            the interpreter (default: the repository's .venv, else python3)
#   AGPO_OVERRIDES    more Hydra overrides (between the script's and the command line's)
#   AGPO_MAX_RESTARTS requeue at most this many times (default 20)
#   AGPO_PLAN_CHECK   1 (default): run `python -m megatron_agpo.plan ... --check` first
#   REPLICA_WAIT_S    seconds to wait for the trainer's rollout endpoint (default 1800)
#   TASK_EXIT_WAIT    seconds srun lets the other ranks run once one has ended (default 300)
#   CPUS_PER_TASK     CPUs per training rank (default: the job's --cpus-per-task)

# Exit code of a trainer that saved a checkpoint on SIGUSR1/SIGTERM and wants to be resumed
# (EX_TEMPFAIL of sysexits.h).
AGPO_EXIT_REQUEUE=75

agpo_log() { echo "[agpo-slurm $(date -u +%H:%M:%S)] $*"; }
agpo_die() {
    echo "agpo-slurm: error: $*" >&2
    exit 2
}

# `#SBATCH --<key>=<value>` of the job script, for dry runs outside an allocation.
agpo_header_value() {
    local file=$1 key=$2
    sed -n "s/^#SBATCH[[:space:]]\+--$key=\([^[:space:]]*\).*/\1/p" "$file" | head -n1
}

# Node names of the allocation (or made-up ones for a dry run outside SLURM).
agpo_nodes() {
    if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null; then
        scontrol show hostnames "$SLURM_JOB_NODELIST"
        return
    fi
    local n=${SLURM_NNODES:-${AGPO_HEADER_NODES:-1}} i
    for ((i = 1; i <= n; i++)); do echo "node$i"; done
}

# One IPv4 address of a host name (what zmq and gloo bind; they do not resolve names there).
agpo_resolve() {
    local ip
    ip=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    echo "${ip:-$1}"
}

# The NCCL/CUDA variables the peers set, each overridable (set it before sbatch to change it).
agpo_gpu_env() {
    # megatron asserts it with TP>1 or CP>1 on Ampere/Hopper: kernels queue in issue order so
    # TP communication overlaps compute as scheduled.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # NCCL's cuMem allocator: verl turns it off (hangs in disaggregated weight sync), NeMo-RL
    # turns it on for cross-node non-colocated vLLM; on is the choice for replicas on their own
    # nodes, off for the trainer-spawned replicas.
    if [[ $ROLLOUT_LAUNCH == external ]]; then
        export NCCL_CUMEM_ENABLE=${NCCL_CUMEM_ENABLE:-1}
    else
        export NCCL_CUMEM_ENABLE=${NCCL_CUMEM_ENABLE:-0}
    fi
    # NVLink SHARP off, as NeMo-RL sets it for non-colocated vLLM (NVLS buffers take GPU
    # memory in every communicator, the weight-sync groups included).
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
    # InfiniBand: Megatron's FSDP recipe values (service level 1, a longer retry timeout for
    # large clusters).
    export NCCL_IB_SL=${NCCL_IB_SL:-1}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
    # Larger chunks for pipeline-parallel sends across nodes (Megatron's recipe).
    export NCCL_P2P_NET_CHUNKSIZE=${NCCL_P2P_NET_CHUNKSIZE:-2097152}
    # Free NCCL buffers on the stream that used them instead of recording streams (less memory).
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    # vLLM's compile cache is per machine; stale entries from other jobs break start-up.
    export VLLM_DISABLE_COMPILE_CACHE=${VLLM_DISABLE_COMPILE_CACHE:-1}
}

# SLURM's numeric variables, checked before any shell arithmetic reads them: bash evaluates
# a variable's value as an expression there (a value like `a[$(cmd)]` would run cmd).
agpo_check_slurm_numbers() {
    local v val
    for v in SLURM_JOB_ID SLURM_NNODES SLURM_CPUS_ON_NODE SLURM_RESTART_COUNT \
        SLURM_NTASKS_PER_NODE SLURM_GPUS_ON_NODE SLURM_JOB_END_TIME SLURM_GPUS_PER_NODE; do
        val=${!v:-}
        [[ $v == SLURM_GPUS_PER_NODE ]] && val=${val##*:} # e.g. h100:8
        [[ -z $val || $val =~ ^[0-9]+$ ]] || agpo_die "$v=${!v} is not a whole number"
    done
}

# Resolve the layout into global variables; no side effects.
agpo_resolve_layout() {
    local v
    agpo_check_slurm_numbers
    for v in TRAIN_NODES ROLLOUT_NODES TASKS_PER_NODE GPUS_PER_NODE ROLLOUT_TP NUM_REPLICAS \
        AGPO_TP AGPO_PP CPUS_PER_TASK AGPO_MAX_RESTARTS; do
        [[ -z ${!v:-} || ${!v} =~ ^[0-9]+$ ]] || agpo_die "$v=${!v} is not a whole number"
    done
    mapfile -t AGPO_NODE_LIST < <(agpo_nodes)
    local n=${#AGPO_NODE_LIST[@]}
    ROLLOUT_NODES=${ROLLOUT_NODES:-0}
    TRAIN_NODES=${TRAIN_NODES:-$((n - ROLLOUT_NODES))}
    if [[ -z ${GPUS_PER_NODE:-} ]]; then
        # Inside the allocation SLURM says (e.g. SLURM_GPUS_PER_NODE=h100:8); outside, the
        # script's #SBATCH --gpus-per-node.
        GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-${AGPO_HEADER_GPUS:-0}}}
        GPUS_PER_NODE=${GPUS_PER_NODE##*:}
    fi
    if ((TRAIN_NODES < 1 || TRAIN_NODES + ROLLOUT_NODES > n)); then
        agpo_die "TRAIN_NODES=$TRAIN_NODES + ROLLOUT_NODES=$ROLLOUT_NODES do not fit the $n \
node(s) of the allocation"
    fi
    local default_tasks=${SLURM_NTASKS_PER_NODE:-${AGPO_HEADER_TASKS:-1}}
    ((GPUS_PER_NODE > 0)) && default_tasks=$GPUS_PER_NODE
    TASKS_PER_NODE=${TASKS_PER_NODE:-$default_tasks}
    TRAIN_WORLD=$((TRAIN_NODES * TASKS_PER_NODE))
    if [[ -n ${AGPO_TP:-} && -n ${AGPO_PP:-} ]] && ((TRAIN_WORLD % (AGPO_TP * AGPO_PP))); then
        agpo_die "$TRAIN_WORLD training ranks ($TRAIN_NODES nodes x $TASKS_PER_NODE) do not \
divide into TP=$AGPO_TP x PP=$AGPO_PP"
    fi
    AGPO_TRAIN_HOSTS=("${AGPO_NODE_LIST[@]:0:TRAIN_NODES}")
    AGPO_ROLLOUT_HOSTS=("${AGPO_NODE_LIST[@]:TRAIN_NODES:ROLLOUT_NODES}")
    if [[ -z ${ROLLOUT_LAUNCH:-} ]]; then
        ((ROLLOUT_NODES > 0)) && ROLLOUT_LAUNCH=external || ROLLOUT_LAUNCH=spawn
    fi
    [[ $ROLLOUT_LAUNCH == external || $ROLLOUT_LAUNCH == spawn ]] ||
        agpo_die "ROLLOUT_LAUNCH=$ROLLOUT_LAUNCH: external or spawn"
    ROLLOUT_TP=${ROLLOUT_TP:-1}
    CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}
    if [[ -z ${NUM_REPLICAS:-} ]]; then
        if ((ROLLOUT_NODES > 0 && GPUS_PER_NODE > 0)); then
            NUM_REPLICAS=$((ROLLOUT_NODES * GPUS_PER_NODE / ROLLOUT_TP))
        else
            NUM_REPLICAS=1
        fi
    fi
    ((NUM_REPLICAS >= 1)) || agpo_die "NUM_REPLICAS=$NUM_REPLICAS: at least 1"
    if ((ROLLOUT_NODES > 0 && GPUS_PER_NODE > 0)); then
        ((ROLLOUT_TP <= GPUS_PER_NODE)) ||
            agpo_die "ROLLOUT_TP=$ROLLOUT_TP is more than GPUS_PER_NODE=$GPUS_PER_NODE (a replica \
lives on one node)"
        local fit=$((ROLLOUT_NODES * (GPUS_PER_NODE / ROLLOUT_TP)))
        ((NUM_REPLICAS <= fit)) || agpo_die "NUM_REPLICAS=$NUM_REPLICAS replicas of \
ROLLOUT_TP=$ROLLOUT_TP GPUs do not fit $ROLLOUT_NODES rollout node(s) of $GPUS_PER_NODE GPUs"
    fi
    if [[ $ROLLOUT_LAUNCH == external ]] && ((ROLLOUT_NODES == 0)); then
        # Replicas share the training nodes (CPU, or a small test): their steps overlap.
        AGPO_ROLLOUT_HOSTS=("${AGPO_TRAIN_HOSTS[@]}")
    fi
    MASTER_ADDR=${MASTER_ADDR:-${AGPO_TRAIN_HOSTS[0]}}
    # Below 32768, Linux's ephemeral port range, so a client socket cannot already hold it; the
    # job id keeps two jobs on one node apart.
    MASTER_PORT=${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}
    ROLLOUT_BIND_HOST=${ROLLOUT_BIND_HOST:-$(agpo_resolve "$MASTER_ADDR")}
    local job_name=${SLURM_JOB_NAME:-${AGPO_HEADER_NAME:-agpo}}
    RUN_DIR=${RUN_DIR:-runs/${job_name%.sh}-${SLURM_JOB_ID:-dryrun}}
    AGPO_LOG_DIR=$RUN_DIR/logs/${SLURM_JOB_ID:-dryrun}-${SLURM_RESTART_COUNT:-0}
    SECRET_FILE=$RUN_DIR/rollout_secret
    ENDPOINT_FILE=$RUN_DIR/rollout_endpoint.json
}

# The Hydra overrides of the training step, in order: layout, job script, env, command line.
agpo_overrides() {
    AGPO_TRAIN_OVERRIDES=(
        "logging.run_dir=$RUN_DIR"
        # A progress bar in a log file is one line per update; the metrics lines remain.
        "logging.progress=false"
        "rollout.engine.num_replicas=$NUM_REPLICAS"
        # What the trainer would start outside srun; agpo-plan checks TP x PP against it.
        "nproc=$TRAIN_WORLD"
    )
    # The cluster agpo-plan sizes for: the training nodes (only the planner has this section).
    AGPO_CLUSTER_OVERRIDES=()
    ((GPUS_PER_NODE > 0)) && AGPO_CLUSTER_OVERRIDES+=(
        "cluster.nodes=$TRAIN_NODES" "cluster.gpus_per_node=$TASKS_PER_NODE")
    if [[ $ROLLOUT_LAUNCH == external ]]; then
        AGPO_TRAIN_OVERRIDES+=(
            "rollout.engine.launch=external"
            "rollout.engine.bind_host=$ROLLOUT_BIND_HOST"
            "rollout.engine.secret_file=$SECRET_FILE"
        )
    fi
    AGPO_TRAIN_OVERRIDES+=("${JOB_OVERRIDES[@]}")
    # shellcheck disable=SC2206  # word splitting wanted: a list of key=value
    [[ -n ${AGPO_OVERRIDES:-} ]] && AGPO_TRAIN_OVERRIDES+=($AGPO_OVERRIDES)
    AGPO_TRAIN_OVERRIDES+=("${AGPO_USER_OVERRIDES[@]}")
}

# A command line as one string that `eval` splits back into the same words; plain words stay
# as they are (readable in logs and dry runs), others are quoted.
agpo_quote() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
            out+=("$a")
        else
            out+=("$(printf '%q' "$a")")
        fi
    done
    echo "${out[*]}"
}

agpo_join() {
    local IFS=,
    echo "$*"
}

# The srun command lines (arrays), for the dry run and the launch alike.
agpo_commands() {
    AGPO_TRAIN_CMD=(
        srun --job-name=train --nodes="$TRAIN_NODES" --ntasks-per-node="$TASKS_PER_NODE"
        --ntasks="$TRAIN_WORLD" --nodelist="$(agpo_join "${AGPO_TRAIN_HOSTS[@]}")"
        # After the first rank ends, the others get this long before being killed: a crashed
        # rank does not leave the rest waiting out the collective timeout.
        --wait="${TASK_EXIT_WAIT:-300}"
        --output="$AGPO_LOG_DIR/train-%t.log"
    )
    # srun 22.05 does not inherit sbatch's --cpus-per-task: say it again.
    [[ -n ${CPUS_PER_TASK:-} ]] && AGPO_TRAIN_CMD+=(--cpus-per-task="$CPUS_PER_TASK")
    # shellcheck disable=SC2206
    [[ -n ${SRUN_ARGS:-} ]] && AGPO_TRAIN_CMD+=($SRUN_ARGS)
    AGPO_TRAIN_CMD+=("$PYTHON" -m megatron_agpo.train "${AGPO_TRAIN_OVERRIDES[@]}")
    AGPO_REPLICA_CMDS=()
    [[ $ROLLOUT_LAUNCH == external ]] || return 0
    local i per_node=1 host
    ((GPUS_PER_NODE > 0 && ROLLOUT_NODES > 0)) && per_node=$((GPUS_PER_NODE / ROLLOUT_TP))
    for ((i = 0; i < NUM_REPLICAS; i++)); do
        host=${AGPO_ROLLOUT_HOSTS[$((i / per_node % ${#AGPO_ROLLOUT_HOSTS[@]}))]}
        local cmd=(srun --job-name="replica$i" --nodes=1 --ntasks=1 --nodelist="$host")
        ((ROLLOUT_NODES == 0)) && cmd+=(--overlap)
        ((GPUS_PER_NODE > 0)) && cmd+=(--gres="gpu:$ROLLOUT_TP")
        # A replica on its own node gets that node's share of CPUs (vLLM starts a worker per
        # GPU plus tokenizer and scheduler threads).
        ((ROLLOUT_NODES > 0)) && [[ -n ${SLURM_CPUS_ON_NODE:-} ]] &&
            cmd+=(--cpus-per-task="$((SLURM_CPUS_ON_NODE / per_node))")
        cmd+=(--output="$AGPO_LOG_DIR/replica-$i.log")
        # shellcheck disable=SC2206
        [[ -n ${SRUN_ARGS:-} ]] && cmd+=($SRUN_ARGS)
        cmd+=("$PYTHON" -m megatron_agpo.rollout.replica_worker --connect-file "$ENDPOINT_FILE"
            --secret-file "$SECRET_FILE" --replica-index "$i")
        # One string per step (bash has no arrays of arrays), quoted for eval.
        AGPO_REPLICA_CMDS+=("$(agpo_quote "${cmd[@]}")")
    done
}

agpo_print_layout() {
    local mp="${AGPO_TP:-?}x${AGPO_PP:-?}"
    echo "agpo-slurm layout"
    echo "  nodes:          ${#AGPO_NODE_LIST[@]} (${AGPO_NODE_LIST[*]})"
    echo "  training:       $TRAIN_NODES node(s) x $TASKS_PER_NODE task(s) = $TRAIN_WORLD ranks" \
        "on ${AGPO_TRAIN_HOSTS[*]}"
    if [[ -n ${AGPO_TP:-} && -n ${AGPO_PP:-} ]]; then
        echo "  parallel:       TP=$AGPO_TP PP=$AGPO_PP DP=$((TRAIN_WORLD / (AGPO_TP * AGPO_PP)))"
    else
        echo "  parallel:       $mp (from the config)"
    fi
    echo "  rollout:        $ROLLOUT_LAUNCH, $NUM_REPLICAS replica(s) x $ROLLOUT_TP GPU(s)" \
        "${AGPO_ROLLOUT_HOSTS[*]:+on ${AGPO_ROLLOUT_HOSTS[*]}}"
    echo "  rendezvous:     MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    [[ $ROLLOUT_LAUNCH == external ]] &&
        echo "  replica channel: bind $ROLLOUT_BIND_HOST, secret $SECRET_FILE (mode 600)"
    echo "  run dir:        $RUN_DIR (logs: $AGPO_LOG_DIR)"
    ((${#AGPO_CLUSTER_OVERRIDES[@]})) &&
        echo "  plan cluster:   ${AGPO_CLUSTER_OVERRIDES[*]} (agpo-plan only)"
    echo "  environment:"
    local v
    for v in CUDA_DEVICE_MAX_CONNECTIONS NCCL_CUMEM_ENABLE NCCL_NVLS_ENABLE NCCL_IB_SL \
        NCCL_IB_TIMEOUT NCCL_P2P_NET_CHUNKSIZE TORCH_NCCL_AVOID_RECORD_STREAMS \
        VLLM_DISABLE_COMPILE_CACHE OMP_NUM_THREADS VLLM_CPU_KVCACHE_SPACE; do
        [[ -n ${!v:-} ]] && echo "    $v=${!v}"
    done
    echo "  training step:"
    echo "    $(agpo_quote "${AGPO_TRAIN_CMD[@]}")"
    local c
    for c in "${AGPO_REPLICA_CMDS[@]}"; do
        echo "  replica step:"
        echo "    $c"
    done
}

# The planner's check of the layout (memory per GPU, divisibility) before anything starts.
agpo_plan_check() {
    [[ ${AGPO_PLAN_CHECK:-1} == 1 ]] || return 0
    # The planner sizes GPU memory; a CPU run has nothing for it to check.
    ((GPUS_PER_NODE > 0)) || return 0
    if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("megatron_agpo.plan.__main__") is None)' 2>/dev/null; then
        agpo_log "warning: megatron_agpo.plan is not available here; the layout is not checked"
        return 0
    fi
    agpo_log "plan check: $PYTHON -m megatron_agpo.plan ... --check"
    local out rc
    out=$(cd "$AGPO_ROOT" && "$PYTHON" -m megatron_agpo.plan "${AGPO_TRAIN_OVERRIDES[@]}" \
        "${AGPO_CLUSTER_OVERRIDES[@]}" \
        --check 2>&1)
    rc=$?
    echo "$out"
    if ((rc != 0)); then
        echo "agpo-slurm: error: the plan check failed (above); fix the layout or set \
AGPO_PLAN_CHECK=0 to launch anyway" >&2
        return 2
    fi
}

# The end of the allocation as epoch seconds, for the trainer's wall-clock guard: Slurm >= 23
# exports SLURM_JOB_END_TIME itself; older controllers answer squeue.
agpo_job_end_time() {
    [[ -n ${SLURM_JOB_END_TIME:-} || -z ${SLURM_JOB_ID:-} ]] && return 0
    local end
    end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)
    if [[ -n $end && $end != N/A && $end != Unknown && $end != NONE ]]; then
        end=$(date -d "$end" +%s 2>/dev/null) && export SLURM_JOB_END_TIME=$end
    fi
}

# SIGUSR1 to the training ranks only. srun (and scancel) would signal every process of the
# step: a rank's reward workers and any replica it spawned would die of it in the middle of
# the step the rank is finishing. `scontrol listpids` marks the task leaders (the ranks) with
# a local id; an overlapping one-task-per-node step signals them on each training node.
agpo_signal_ranks() {
    local step
    step=$(squeue -s -h -j "$SLURM_JOB_ID" -o "%i %j" 2>/dev/null |
        awk '$2 == "train" {split($1, a, "."); print a[2]; exit}')
    if [[ -n $step ]]; then
        # On each node: the pids whose LOCALID is set (the task leaders); none is a failure.
        local remote="pids=\$(scontrol listpids $SLURM_JOB_ID.$step | awk 'NR > 1 && \$4 != \"-\" \
{print \$1}'); [ -n \"\$pids\" ] && kill -USR1 \$pids && echo \"\$(hostname): SIGUSR1 to \
ranks \$(echo \$pids)\""
        srun --overlap --quiet --job-name=signal --nodes="$TRAIN_NODES" --ntasks="$TRAIN_NODES" \
            --ntasks-per-node=1 \
            --nodelist="$(agpo_join "${AGPO_TRAIN_HOSTS[@]}")" \
            bash -c "$remote" && return 0
    fi
    agpo_log "could not signal the ranks alone: SIGUSR1 to every process of the training step"
    kill -USR1 "$AGPO_TRAIN_PID" 2>/dev/null
}

AGPO_SIGNALLED=""
AGPO_TRAIN_PID=""
agpo_on_signal() {
    local sig=$1
    agpo_log "caught SIG$sig: forwarding SIGUSR1 to the training ranks (checkpoint and exit)"
    AGPO_SIGNALLED=$sig
    [[ -n $AGPO_TRAIN_PID ]] && agpo_signal_ranks
}

agpo_launch() {
    mkdir -p "$RUN_DIR" "$AGPO_LOG_DIR" || agpo_die "cannot create RUN_DIR=$RUN_DIR"
    agpo_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${AGPO_NODE_LIST[*]};" \
        "logs in $AGPO_LOG_DIR"
    agpo_job_end_time
    [[ -n ${SLURM_JOB_END_TIME:-} ]] && agpo_log "allocation ends at" \
        "$(date -u -d "@$SLURM_JOB_END_TIME" +%FT%TZ) (SLURM_JOB_END_TIME=$SLURM_JOB_END_TIME)"
    # Many sockets and files per rank (NCCL, ZMQ, data loaders).
    ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
    local pids=() rc c
    if [[ $ROLLOUT_LAUNCH == external ]]; then
        # A fresh secret per start of the job; only the job's user can read it.
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' \
            >"$SECRET_FILE") || agpo_die "cannot write $SECRET_FILE"
        chmod 600 "$SECRET_FILE"
        # A previous start's endpoint would send replicas to a trainer that is gone.
        rm -f "$ENDPOINT_FILE"
    fi
    trap 'agpo_on_signal USR1' USR1
    trap 'agpo_on_signal TERM' TERM
    export MASTER_ADDR MASTER_PORT
    agpo_log "training step: $(agpo_quote "${AGPO_TRAIN_CMD[@]}")"
    (cd "$AGPO_ROOT" && exec "${AGPO_TRAIN_CMD[@]}") &
    AGPO_TRAIN_PID=$!
    if [[ $ROLLOUT_LAUNCH == external ]]; then
        local waited=0
        while [[ ! -s $ENDPOINT_FILE ]] && kill -0 "$AGPO_TRAIN_PID" 2>/dev/null &&
            ((waited < ${REPLICA_WAIT_S:-1800})); do
            sleep 2
            waited=$((waited + 2))
        done
        if [[ -s $ENDPOINT_FILE ]]; then
            for c in "${AGPO_REPLICA_CMDS[@]}"; do
                agpo_log "replica step: $c"
                (cd "$AGPO_ROOT" && eval "exec $c") &
                pids+=($!)
            done
        else
            agpo_log "no rollout endpoint in $ENDPOINT_FILE after ${waited}s; no replica started"
        fi
    fi
    # `wait` returns early (status > 128) when a trapped signal arrives: wait again until the
    # training step has really ended.
    rc=0
    while kill -0 "$AGPO_TRAIN_PID" 2>/dev/null; do
        wait "$AGPO_TRAIN_PID"
        rc=$?
    done
    # The step may have ended between an interrupted wait and the check: its status is still
    # waiting to be collected then (127 when it was collected already).
    wait "$AGPO_TRAIN_PID" 2>/dev/null
    local last=$?
    ((last != 127)) && rc=$last
    AGPO_TRAIN_PID=""
    agpo_log "training step ended with exit code $rc"
    if ((${#pids[@]})); then
        # Replicas exit when the trainer goes away; give them a moment, then stop them (srun
        # passes SIGTERM on), and stop waiting for a replica that does not go within 30 s.
        sleep 2
        kill -TERM "${pids[@]}" 2>/dev/null
        local i
        for ((i = 0; i < 30; i++)); do
            kill -0 "${pids[@]}" 2>/dev/null || break
            sleep 1
        done
        kill -KILL "${pids[@]}" 2>/dev/null
        wait "${pids[@]}" 2>/dev/null
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} max=${AGPO_MAX_RESTARTS:-20}
    if ((rc == AGPO_EXIT_REQUEUE)) || [[ -n $AGPO_SIGNALLED && $rc -ne 0 ]]; then
        if ((rc != AGPO_EXIT_REQUEUE)); then
            agpo_log "warning: the trainer did not save on SIG$AGPO_SIGNALLED (exit $rc);" \
                "the requeued job resumes from the last periodic checkpoint"
        fi
        if [[ -z ${SLURM_JOB_ID:-} ]]; then
            agpo_log "not under SLURM: nothing to requeue"
        elif ((restarts >= max)); then
            agpo_log "restart $restarts reached AGPO_MAX_RESTARTS=$max: not requeueing"
        else
            agpo_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
            # The controller ends this batch shell and starts the script again from the top;
            # checkpoint.resume=auto picks the checkpoint just written.
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            agpo_log "scontrol requeue failed"
        fi
    fi
    return "$rc"
}

agpo_main() {
    AGPO_USER_OVERRIDES=()
    local a
    for a in "$@"; do
        case $a in
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
            sed -n '2,/^$/p' "$AGPO_ROOT/slurm/common.sh" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        -*) agpo_die "unknown option $a (options: --dry-run; other arguments are Hydra overrides)" ;;
        *) AGPO_USER_OVERRIDES+=("$a") ;;
        esac
    done
    local script=${AGPO_JOB_SCRIPT:-$0}
    if [[ -f $script ]]; then
        AGPO_HEADER_NODES=$(agpo_header_value "$script" nodes)
        AGPO_HEADER_NAME=$(agpo_header_value "$script" job-name)
        AGPO_HEADER_TASKS=$(agpo_header_value "$script" ntasks-per-node)
        AGPO_HEADER_GPUS=$(agpo_header_value "$script" gpus-per-node)
        if [[ -z $AGPO_HEADER_GPUS ]]; then
            local gres
            gres=$(agpo_header_value "$script" gres)
            [[ $gres == gpu* ]] && AGPO_HEADER_GPUS=${gres##*:}
        fi
    fi
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $AGPO_ROOT/.venv/bin/python ]]; then
            PYTHON=$AGPO_ROOT/.venv/bin/python
        else
            PYTHON=python3
        fi
    fi
    agpo_resolve_layout
    agpo_gpu_env_maybe
    agpo_overrides
    agpo_commands
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        agpo_print_layout
        agpo_plan_check
        local rc=$?
        echo "dry run: nothing launched"
        return $rc
    fi
    [[ -n ${SLURM_JOB_ID:-} ]] || agpo_die "not inside a SLURM allocation: submit with \
sbatch, or add --dry-run to see the commands"
    agpo_print_layout
    agpo_plan_check || exit 2
    agpo_launch
}

agpo_gpu_env_maybe() {
    ((GPUS_PER_NODE > 0)) && agpo_gpu_env
    return 0
}
