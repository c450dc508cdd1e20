"""The expert actor: hosts some experts' weights and runs their FFNs for the token batches the front sends."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.metrics import Counter

from experts.checkpoint import SwitchCheckpoint
from experts.ffn import ACTIVATION_FUNCTIONS, grouped_ffn
from experts.held import gpu_bytes, gpu_uuid, held_weight
from experts.spec import ExpertKey
from experts.wire import call_from_wire, to_wire, torch_dtype

log = logging.getLogger(__name__)


def disk_bytes_read() -> int:
    """Bytes this process has had read from storage (Linux; page-cache hits do not count), 0 elsewhere."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line.split()[1] for line in f if line.startswith("read_bytes:")))
    except OSError:
        return 0


def expert_token_counter() -> Counter:
    """The metric of tokens computed per expert, recorded where they are computed (the actors, or a front that
    computed a layer itself)."""
    return Counter("switch_serve_expert_tokens", "Tokens computed per expert",
                   tag_keys=("model", "stack", "layer", "expert"))


class ExpertActor:
    """Wrapped with `ray.remote` by the launcher. Holds no per-request state, so a restart loses nothing.

    `experts` maps each hosted expert to the names of its (wi, wo) tensors in `checkpoint`, the only tensors
    this actor reads. Runs on the GPU Ray gave it, if any, in `dtype`; holds the weights as `quantize` says.
    `model_id` labels its metrics (the served model's id; default: the checkpoint folder's name).
    """

    def __init__(self, checkpoint: SwitchCheckpoint, experts: dict[ExpertKey, tuple[str, str]], dtype: str = "fp32",
                 quantize: str = "none", model_id: str | None = None):
        self.checkpoint = checkpoint
        gpus = ray.get_gpu_ids()
        if gpus and not torch.cuda.is_available():  # its experts then take host memory, not the GPU's
            log.warning("expert actor given GPU %s, but its torch (%s) has no CUDA: its experts compute on the CPU",
                        gpus, torch.__version__)
        self.device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
        self.dtype = torch_dtype(dtype)
        before, read, held, loaded = disk_bytes_read(), 0, 0, {}
        # One tensor at a time onto the device: host memory never holds more than one.
        for name, tensor in checkpoint.iter_tensors([name for pair in experts.values() for name in pair]):
            read += tensor.nbytes
            loaded[name] = held_weight(tensor, self.device, self.dtype, quantize)
            held += loaded[name].nbytes
        self.weights = {key: (loaded[wi], loaded[wo]) for key, (wi, wo) in experts.items()}
        # Bytes read from the checkpoint and held for computing; from storage, as the kernel counted them.
        self.loaded = {"tensor_bytes": read, "held_bytes": held, "disk_bytes_read": disk_bytes_read() - before}
        self.act = ACTIVATION_FUNCTIONS[checkpoint.config.dense_act_fn]
        self.tokens = dict.fromkeys(self.weights, 0)  # tokens computed per hosted expert, from every front
        self.calls = 0  # forward calls begun
        self.call_log: list[float] | None = None  # see log_calls
        self.fault: tuple[int, float | None] | None = None  # see inject_fault
        self.token_metric = expert_token_counter()
        self.model_id = model_id or Path(checkpoint.path).name

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "gpu_ids": ray.get_gpu_ids(),
                "device": str(self.device), "gpu_uuid": gpu_uuid(self.device), "gpu_bytes": gpu_bytes(self.device),
                "experts": sorted(self.weights),
                **self.loaded}

    def token_counts(self) -> dict[ExpertKey, int]:
        return dict(self.tokens)

    def log_calls(self, on: bool) -> list[float]:
        """For the benchmark's breakdown: the compute time of each forward call logged since the last `log_calls`, in
        the order of the calls; from now on, log them if `on`."""
        logged, self.call_log = self.call_log or [], [] if on else None
        return logged

    def tensors_read(self) -> list[str]:
        """The checkpoint's tensors this actor has read (its own experts' alone, as the tests check)."""
        return sorted(self.checkpoint.names_read)

    def inject_fault(self, at_call: int, stall_s: float | None = None) -> None:
        """For tests: at this actor's `at_call`-th forward call from now, exit its process (as a crash or the
        OOM killer would), or with `stall_s` stall that long before computing. Only a Ray actor handle reaches
        it, never a request; an actor started again after the exit has no fault."""
        self.fault = (self.calls + at_call, stall_s)

    # Ray records no task events of these calls (its dashboard's and state API's list of tasks), as Serve does for its
    # replicas: a call per sparse layer and step would report hundreds a second to the GCS. In a loop of calls that
    # each took 1.5 ms, 0.13-0.31 ms less a round trip on a 2-vCPU VM (docs/BENCHMARKS.md).
    @ray.method(enable_task_events=False)
    @torch.inference_mode()
    def forward(self, call: bytes | np.ndarray) -> bytes | np.ndarray:
        """`call` (experts.wire.call_to_wire) holds counts[i] tokens for experts[i] of a sparse layer, back to back;
        returns their FFN outputs in the same order."""
        self.calls += 1
        if self.fault is not None and self.calls == self.fault[0]:
            if self.fault[1] is None:
                os._exit(1)
            time.sleep(self.fault[1])
        began = time.perf_counter()
        stack, layer, experts, counts, hidden = call_from_wire(call, self.dtype, self.checkpoint.config.d_model)
        hidden = hidden.to(self.device)
        weights = [self.weights[(stack, layer, e)] for e in experts]
        out = to_wire(grouped_ffn(hidden, counts, weights, self.act))
        if self.call_log is not None:
            self.call_log.append(time.perf_counter() - began)
        for e, n in zip(experts, counts):
            self.tokens[(stack, layer, e)] += n
            self.token_metric.inc(n, tags={"model": self.model_id, "stack": stack, "layer": str(layer),
                                           "expert": str(e)})
        return out
