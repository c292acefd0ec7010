# Shared by the bench scripts (sourced): a free port on 127.0.0.1, a wait for a server's model
# to be ready, and the bench models.
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_ready PORT: up to 30 s for /v1/health to say "ready".
wait_ready() {
  for _ in $(seq 150); do
    /usr/bin/python3 -c "import urllib.request,sys; sys.exit(0 if b'ready' in urllib.request.urlopen('http://127.0.0.1:$1/v1/health').read() else 1)" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "the server on port $1 never became ready" >&2
  return 1
}
# bench_model SHAPE: the checkpoint directory of a bench model: the committed fixture for `tiny`,
# else a random-weight model made once under .bench/ with the Python reference (`small`, `2b`).
bench_model() {
  if [ "$1" = tiny ]; then
    echo "$PWD/fixtures/models/tiny-tied"
    return
  fi
  mkdir -p .bench
  local model=$PWD/.bench/$1-model
  [ -f "$model/model.safetensors" ] || tools/reference/run.sh make_bench_model.py "$model" "$1" >/dev/null
  echo "$model"
}
# inference_bench BENCH SHAPE DEVICE: the inference crate's bench binary BENCH on a bench model
# (see bench_model), on `cpu` or with the CUDA build.
inference_bench() {
  local model features=()
  model=$(bench_model "$2")
  [ "$3" = cpu ] || features=(--features cuda)
  LOOKOUT_BENCH_MODEL=$model LOOKOUT_BENCH_DEVICE=$3 cargo bench -q --locked -p inference "${features[@]}" --bench "$1"
}
