# One image for every fleetlearn process: broker, aggregator or vehicle
# agent. NOTE: untested, because the development machines have no Docker
# engine.
#
#   docker build -t fleetlearn .
#   docker run --rm -p 1883:1883 fleetlearn npm run broker -- --host 0.0.0.0
#   docker run --rm fleetlearn npm run aggregator -- --broker-url mqtt://broker:1883
#   docker run --rm -v /frames:/frames fleetlearn npm run agent -- run \
#     --vehicle-id veh-001 --data /frames --broker-url mqtt://broker:1883
#
# For a CUDA host, build on a CUDA base image so that the optional
# @tensorflow/tfjs-node-gpu dependency installs and trains on the GPU:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:11.8.0-cudnn8-runtime-ubuntu22.04 .
ARG BASE_IMAGE=node:20-bookworm-slim
FROM ${BASE_IMAGE}

# CUDA base images have no Node.js; install it from the distribution there.
# python3, make and g++ build the native aggregation kernel (node-gyp).
RUN apt-get update && \
    if ! command -v node >/dev/null; then \
      apt-get install -y --no-install-recommends nodejs npm ca-certificates; \
    fi && \
    apt-get install -y --no-install-recommends python3 make g++ && \
    rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY package.json package-lock.json ./
# onnxruntime-node ships its CPU binaries in the package; skip its CUDA
# download. tfjs-node-gpu is optional: where libtensorflow cannot be
# downloaded, its install fails and the agent trains on wasm instead.
ENV ONNXRUNTIME_NODE_INSTALL=skip
RUN npm ci --no-audit --no-fund --omit=dev --include=optional || \
    npm ci --no-audit --no-fund --omit=dev --omit=optional

COPY . .
# The install script above ran before binding.gyp was copied, so build the
# native kernel now; without it the aggregator uses the WebAssembly kernel.
RUN npm run build:native || echo "native kernel not built; using WebAssembly"
# The processes write their state under /app by default.
RUN mkdir -p /app/state /app/runs /app/data && \
    chown node:node /app/state /app/runs /app/data
ENV NODE_ENV=production
USER node
CMD ["npm", "run", "broker", "--", "--host", "0.0.0.0"]
