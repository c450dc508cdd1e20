"""The engine and the Python API: a checkpoint served as one model whose experts live in Ray actors.

    with SwitchCluster("path/to/checkpoint", placement=PlacementConfig(experts_per_actor=2)) as model:
        outputs = model.generate([[13, 7, 1]], max_new_tokens=16)
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import ray
import torch

from experts.checkpoint import CheckpointError, SwitchCheckpoint, has_tokenizer, unapplied_generation_settings
from experts.ffn import ACTIVATION_FUNCTIONS, packs
from experts.fleet import FleetActors, fleet_name, served_placement, start_fleet, stop_fleet
from experts.held import gpu_uuid, held_experts
from experts.placement import PlacementError
from experts.plan import ACTIVATION_RESERVE
from experts.spec import CONFIG_FILE, TOKENIZER_FILES, ExpertKey, expert_bytes, expert_format
from experts.wire import INLINE_ACTIVATIONS_ENV, torch_dtype
from router_service.batching import ContinuousBatcher, Sequence, run_to_completion, use_threads
from router_service.config import EngineConfig
from router_service.dispatch import ExpertDispatcher, ExpertsUnavailable
from router_service.model import SwitchFront
from router_service.requests import (
    DEFAULT_POOLING,
    InvalidRequest,
    check_pooling,
    check_prompt,
    check_prompt_text,
    is_list,
    make_sampling_params,
    nth_seed,
)
from router_service.text import TextStream, check_stop_strings

SENTINEL = re.compile(r"<extra_id_\d+>")  # T5's span-filling sentinels

# How long one call to the fleet waits for its actors to load, between updates of the link's status.
FLEET_POLL_S = 5.0
# How often a front checks that its fleet is the one that started its actors.
LINK_CHECK_S = 2.0
# How often a wait for the expert actors with no deadline says what they wait for (and whenever that changes).
STATUS_LOG_S = 30.0

log = logging.getLogger(__name__)


def load_tokenizer(folder: str | Path, field: str = "text"):
    """The tokenizer saved in a checkpoint folder, by transformers' AutoTokenizer; where it holds none, an
    InvalidRequest naming `field`, the one that brought text."""
    path = Path(folder)
    if not has_tokenizer(path):
        raise InvalidRequest(field, f"{path} holds no tokenizer; pass token ids instead")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a broken file of it (a copy cut short, say): named, as a bad checkpoint's are
        files = ", ".join(name for name in TOKENIZER_FILES if (path / name).is_file())
        raise CheckpointError(f"{path}: its tokenizer ({files}) does not load: {first_line(e)}") from e


def text_prompt_ids(tokenizer, text: str, vocab_size: int, limits: EngineConfig, field: str) -> list[int]:
    """A prompt given as text, checked before and after the tokenizer makes its ids."""
    return check_prompt(tokenizer(check_prompt_text(text, limits, field))["input_ids"], vocab_size, limits, field)


def count_expert_tokens(per_actor: list[dict], num_experts: int) -> dict[tuple[str, int], list[int]]:
    """{(stack, layer): tokens per expert} from the actors' own counts."""
    table: dict[tuple[str, int], list[int]] = {}
    for counts in per_actor:
        # A copy, made at once under the GIL: the front's own counts gain keys on its batching thread meanwhile.
        for (stack, layer, expert), n in list(counts.items()):
            table.setdefault((stack, layer), [0] * num_experts)[expert] += n
    return dict(sorted(table.items(), key=lambda item: (item[0][0] != "encoder", item[0][1])))


class ExpertLink:
    """Keeps the dispatcher's expert actors current: asks the fleet for them until they have loaded; every few
    seconds checks that they live and that the fleet is still the one that started them (it started again, with
    new actors, if not); asks again as soon as a call finds an actor dead. A fleet that does not answer in time
    (Serve has not yet noticed it died) leaves live actors in use, and so does a fleet that serves another
    checkpoint, placement or dtype than `serves` (while a config change is under way, the other config's), and one
    that replaces theirs serving the same (another version: a change of the served model's name, say; or the same,
    waiting for theirs to stop), which keeps their actors until its fronts have drained.
    `status` says why the experts are not ready while they are not."""

    def __init__(self, fleet, serves: str, dispatcher: ExpertDispatcher, local_experts=lambda actors: ({}, {})):
        self.fleet, self.serves, self.dispatcher = fleet, serves, dispatcher
        # actors -> the weights of the experts the dispatcher may compute itself, and of its layers held stacked
        self.local_experts = local_experts
        self.status = "asking the expert fleet for its actors"
        self.load_error: BaseException | None = None  # what the fleet answered instead of its actors: its load failed
        self.placement = None  # the fleet's, with its actors: which actor hosts which expert
        self.behind_predecessor = False  # as the fleet last said before its actors (FleetActors.behind_predecessor)
        self.ready = threading.Event()
        self._fleet_id = self._fleet_name = None  # those of the fleet that handed out the actors in use
        self._late: LateActors | None = None  # those in use whose calls went unanswered (see _on_late)
        self._taking = threading.Lock()  # held while new actors are taken up, and a call's loss of the old ones told
        self._wake = threading.Event()
        self._closed = False
        dispatcher.on_lost, dispatcher.on_late = self._on_call_lost, self._on_late
        threading.Thread(target=self._run, name="switch-serve-experts", daemon=True).start()

    def wait(self, timeout_s: float) -> bool:
        return self.ready.wait(timeout_s)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _on_call_lost(self, why: BaseException, actors: list) -> None:
        """A call found its actor dead (the dispatcher tells, from the batching thread): no news where the actors its
        layer went to were replaced meanwhile (their fleet started again while the layer's calls were out)."""
        with self._taking:
            if actors == self.dispatcher.actors:
                self._on_lost(why)

    def _on_late(self, why: BaseException, late: list[int], actors: list) -> None:
        """A layer's calls went unanswered past the restart timeout (the dispatcher tells, from the batching thread):
        until those actors answer, the front takes no requests (each batch would wait as long and fail) and says why."""
        with self._taking:
            if not late or actors != self.dispatcher.actors:
                return
            if self._late is not None:  # another micro-batch's layer of the same step, say: waited for too
                self._late.add({i: actors[i] for i in late})
                return
            if not self.ready.is_set():
                return
            self._late = LateActors({i: actors[i] for i in late})
            log.warning("%s; serving nothing until they answer", first_line(why))
            self.ready.clear()
            self.status = f"{first_line(why)}; waiting for them to answer"
            self._wake.set()

    def _back_from_late(self, late: LateActors) -> bool:
        """Waits up to LINK_CHECK_S for the late actors' answers; whether to go on looking at the fleet: once every one
        has answered alive (the front serves again), one is dead (left to that look: their fleet starts it again
        where it is dead for good), or a loss was told meanwhile."""
        answered = late.answered(LINK_CHECK_S)
        with self._taking:
            if self._late is not late:  # a loss told meanwhile (_on_lost)
                return True
            if answered is None or (answered and late.pings):  # (pings: actors added meanwhile, see _on_late)
                return False
            self._late = None
            if answered:
                self.status = "ready"
                self.ready.set()
            return True

    def _lost(self, why: str) -> None:
        """_on_lost, told by the link's own look (under the lock, as a call's loss and lateness are told)."""
        with self._taking:
            self._on_lost(why)

    def _on_lost(self, why: BaseException | str) -> None:
        """The actors in use are lost (the caller holds _taking)."""
        if self.ready.is_set():
            log.warning("expert actors lost: %s", first_line(why))
        self.ready.clear()
        self._late = None  # their fleet's actors are looked at again, whatever the late ones answer
        self.status = f"expert actors lost ({first_line(why)}); waiting for their fleet to start new ones"
        self._wake.set()

    def _run(self) -> None:
        # Its math (packing or quantizing the experts the front computes) on one OpenMP thread: a second OpenMP team
        # in the process makes every team's idle threads sleep between ops (router_service.scheduler).
        use_threads(1)
        while not self._closed:
            try:
                idle = self._check()
            except Exception as e:  # taking up the actors failed (no memory for the front's copies, say): again
                log.exception("taking up the expert actors failed")
                if not self.ready.is_set():
                    self.status = f"taking up the expert actors failed ({first_line(e)}); trying again"
                idle = True
            if idle:
                self._wake.wait(LINK_CHECK_S)
                self._wake.clear()

    def _check(self) -> bool:
        """One look at the actors and their fleet; whether to wait before the next."""
        late = self._late
        if late is not None and not self._back_from_late(late):
            return False  # (waited for them)
        ready = self.ready.is_set()
        if ready and self.dispatcher.actors_dead():  # their fleet died, or they were killed for good
            self._lost("an expert actor is dead")
            return False
        try:
            view = call(self.fleet.actors.remote(0.0 if ready else FLEET_POLL_S), FLEET_POLL_S + LINK_CHECK_S)
        except TimeoutError:  # Serve has yet to notice that it died, or it is starting again
            view = FleetActors([], f"the expert fleet did not answer within {FLEET_POLL_S + LINK_CHECK_S:.0f} s",
                               "", "")
        except Exception as e:  # gone, or its load failed (Serve starts it again)
            view = FleetActors([], f"expert fleet: {first_line(e)}", "", "")
            self.load_error = e if isinstance(e, ray.exceptions.RayTaskError) else None
        else:
            self.load_error = None
        if view.serves and view.serves != self.serves:
            view = FleetActors([], f"the expert fleet serves another config ({view.serves}, this front's is "
                                   f"{self.serves}); waiting for this config's", "", "")
        if (ready and view.fleet_id and view.fleet_id != self._fleet_id
                and (view.name != self._fleet_name or view.replacing)):
            return True  # one that replaces theirs, of the same experts: theirs keeps their actors while they drain
        if ready and view.fleet_id and (view.fleet_id != self._fleet_id or not view.actors):
            self._lost(view.status if not view.actors else "their fleet started again")
        elif ready and view.moving:  # a batch's calls to them wait, up to restart_timeout_s; new requests should not
            self._lost(view.moving)
        elif not ready and view.actors and not view.moving:
            if view.fleet_id == self._fleet_id and call(self.fleet.replace_dead.remote(view.fleet_id),
                                                        FLEET_POLL_S + LINK_CHECK_S):
                self.status = "expert actors dead for good; their fleet is starting them again"
                return False
            local = self.local_experts(view.actors)
            with self._taking:
                self.dispatcher.use(view.actors, *local, owners=view.placement.owners())
                self.placement = view.placement
                self._fleet_id, self._fleet_name = view.fleet_id, view.name
                self.status = "ready"
                self.ready.set()
        elif not ready:
            self.status = view.moving or view.status
            self.behind_predecessor = view.behind_predecessor
        return self.ready.is_set() or not view.fleet_id or bool(view.moving)


class LateActors:
    """Expert actors whose calls went unanswered past the restart timeout, pinged until each answers (the pings not
    cancelled, see experts.fleet.dead_for_good: one restarting answers once back, one busy once its calls are done)."""

    def __init__(self, actors: dict):
        self.actors = actors  # by index in the placement
        self.pings = {i: actor.info.remote() for i, actor in actors.items()}  # of those yet to answer

    def add(self, actors: dict) -> None:
        """Those of `actors` not pinged yet, pinged too."""
        for i, actor in actors.items():
            if i not in self.actors:
                self.actors[i] = actor
                self.pings[i] = actor.info.remote()

    def answered(self, timeout_s: float) -> bool | None:
        """Waits up to `timeout_s` for the pings: True once every actor has answered alive, False where one is dead (or
        its answer was lost), None while some have yet to answer (one unavailable, restarting, is pinged again)."""
        done, _ = ray.wait(list(self.pings.values()), num_returns=len(self.pings), timeout=timeout_s)
        done = set(done)
        for i, ping in list(self.pings.items()):
            if ping not in done:
                continue
            try:
                ray.get(ping)
            except ray.exceptions.ActorUnavailableError:
                self.pings[i] = self.actors[i].info.remote()
                continue
            except Exception:  # dead, or its answer lost
                return False
            del self.pings[i]
        return None if self.pings else True


def call(response, timeout_s: float):
    """The result of a method called on the fleet: a Ray actor's object ref, or a Serve deployment response. One
    that times out is cancelled: left queued for a fleet that is starting again, each such call would hold one of
    its threads for up to FLEET_POLL_S once it starts, and the calls that matter would queue behind them."""
    served = hasattr(response, "result")
    try:
        return response.result(timeout_s=timeout_s) if served else ray.get(response, timeout=timeout_s)
    except TimeoutError:
        if served:
            response.cancel()
        else:
            ray.cancel(response)
        raise


def first_line(error: BaseException) -> str:
    """An error's first line; for one Ray passed on from another process (raised by a task, or by an actor as it
    started), the original's: the last line of the traceback Ray's message ends with ("module.Kind: message")."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    from_elsewhere = isinstance(error, ray.exceptions.RayTaskError) or getattr(error, "actor_init_failed", False)
    return lines[-1] if from_elsewhere else lines[0]


def experts_beside(infos: list[dict], node_id: str, gpu: str | None) -> list[ExpertKey]:
    """The experts of the actors (`infos`: ExpertActor.info's) that compute where a front does: on its node, and on
    its GPU (`gpu`, its UUID) or, for a front on the CPU (None), on the CPU."""
    return [tuple(key) for info in infos if info["node_id"] == node_id and info["gpu_uuid"] == gpu
            for key in info["experts"]]


# Of a node's memory, what a front on its CPU leaves free as it copies the experts it computes there (for the requests'
# activations, and the node's other processes).
HOST_RESERVE = 0.10


# A cgroup's memory files, v2's and v1's: its limit, its use, and the name in memory.stat of its page cache that the
# kernel reclaims first. v1's limit is a number above the node's memory where there is none.
CGROUP_MEMORY = {"v2": (Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"),
                 "v1": (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes",
                        "total_inactive_file")}


def host_memory(proc: Path = Path("/proc"), cgroups: dict = CGROUP_MEMORY) -> tuple[int, int] | None:
    """(available, total) bytes of this node's memory for this process (None where the kernel does not say): its
    MemAvailable and MemTotal and, under a cgroup's memory limit (a container's), no more than the limit and what
    it leaves beyond the group's use, not counting the page cache the kernel would reclaim first."""
    try:
        lines = (proc / "meminfo").read_text().splitlines()
    except OSError:
        return None
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}  # "MemTotal:  24684 kB"
    available, total = meminfo["MemAvailable"], meminfo["MemTotal"]
    for folder, limit_file, use_file, cache in cgroups.values():
        try:
            limit = (folder / limit_file).read_text().strip()
        except OSError:
            continue
        if limit != "max" and int(limit) < total:
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            used = int((folder / use_file).read_text()) - int(stat[cache])
            available, total = min(available, int(limit) - used), int(limit)
        break
    return available, total


def fitting(keys: list[ExpertKey], room: int, num_experts: int) -> list[ExpertKey]:
    """At most `room` of these experts: every expert of as many layers as fit (a layer held whole is computed stacked
    on a GPU, see held_experts), the layers with the most of `keys` first, then what room is left from the next."""
    layers: dict[tuple[str, int], list[ExpertKey]] = {}
    for key in keys:
        layers.setdefault(key[:2], []).append(key)
    order = sorted(layers.values(), key=lambda group: (len(group) < num_experts, -len(group)))
    whole = [group for group in order if len(group) == num_experts][:room // num_experts]
    rest = [key for group in order if group not in whole for key in group]
    chosen = [key for group in whole for key in group]
    return chosen + rest[:room - len(chosen)]


class SwitchCluster:
    """A checkpoint served with expert parallelism: the front here, the experts in Ray actors placed as
    `config.placement` says, both in `config.dtype` (default: the checkpoint's). The front runs on the GPU when
    this process has one.

    Takes an EngineConfig, or the checkpoint folder and EngineConfig's other fields as keywords. Starts a local
    Ray cluster unless one is running or `address` names one to join. The expert actors come from `fleet` (an
    experts.fleet.ExpertFleet running as a Ray actor or a Serve deployment); without one, this object starts its
    own and stops it on shutdown. With `wait`, returns once the actors have loaded (PlacementError after
    `placement.timeout_s`); without, they join in the background (see `experts_ready`).
    `metrics` (a router_service.metrics.ServingMetrics) records the batches and the expert round trips."""

    def __init__(self, model: str | os.PathLike | EngineConfig, *, address: str | None = None, fleet=None,
                 wait: bool = True, metrics=None, **options):
        self.config = model if isinstance(model, EngineConfig) else EngineConfig(model=str(model), **options)
        self.checkpoint = SwitchCheckpoint.open(self.config.model)
        if unapplied := unapplied_generation_settings(Path(self.checkpoint.path) / CONFIG_FILE):
            log.warning("the checkpoint's generation config sets %s, which switch-serve does not apply: each "
                        "request decodes by its own options (greedy unless it samples)", ", ".join(unapplied))
        self.capacity = self.config.capacity
        self._tokenizer, self._hidden_ids = None, None
        self._owns_fleet, self.fleet, self.link = fleet is None, None, None
        self._held, self._stacks = {}, {}  # the experts this front computes, as _local_experts last built them
        self._stepping = threading.Lock()  # the batcher steps on one thread at a time: calls from others take turns
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Ray reads it as it starts in this process, whose front sends the activations; then it is taken back.
            added = {name: value for name, value in INLINE_ACTIVATIONS_ENV.items() if name not in os.environ}
            os.environ.update(added)
            try:
                ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False)
            finally:
                for name in added:
                    del os.environ[name]
        try:
            placement = self.config.placement
            quantize = self.config.quantize
            self.dtype = self.checkpoint.served_dtype(self.config.dtype)
            if fleet is None:  # a placement that does not fit fails here, saying why, not in the fleet's actor
                self.fleet = start_fleet(self.checkpoint, placement, self.dtype, quantize,
                                         served_placement(self.checkpoint, placement, self.dtype, quantize))
            else:
                self.fleet = fleet
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.dispatcher = ExpertDispatcher([], {}, self.checkpoint.config.num_experts,
                                               metrics, placement.restart_timeout_s,
                                               ACTIVATION_FUNCTIONS[self.checkpoint.config.dense_act_fn])
            self.front = SwitchFront(self.checkpoint, self.dispatcher, self.capacity, torch_dtype(self.dtype), device,
                                     self.config.micro_batches, self.config.packed_weights)
            self.link = ExpertLink(self.fleet, fleet_name(self.checkpoint, placement, self.dtype, quantize),
                                   self.dispatcher, self._local_experts)
            if wait:
                self.wait_for_experts(placement.timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.batcher = ContinuousBatcher(self.front, self.config.max_sequences, metrics)

    def wait_for_experts(self, timeout_s: float | None, behind_predecessor: bool = False) -> None:
        """Until the expert actors have loaded: PlacementError after `timeout_s` (None: however long it takes, saying
        what they wait for every STATUS_LOG_S and as it changes), or as soon as the load of a fleet this object
        started fails (Serve starts its fleets again; nothing would start this one again). With
        `behind_predecessor`, it also ends (without them) once their fleet waits for room that the fleet it
        replaces holds (FleetActors.behind_predecessor)."""
        began = time.monotonic()
        deadline = math.inf if timeout_s is None else began + timeout_s
        said, said_at = None, began
        while not self.link.wait(min(LINK_CHECK_S, max(0.0, deadline - time.monotonic()))):
            if self._owns_fleet and self.link.load_error is not None:
                raise PlacementError(f"placement: the expert actors failed to load: {first_line(self.link.load_error)}")
            if time.monotonic() >= deadline:
                raise PlacementError(f"placement: the expert actors were not up within {timeout_s:.0f} s: "
                                     f"{self.link.status}")
            if behind_predecessor and self.link.behind_predecessor:
                log.warning("starting without the expert actors, whose fleet waits for room that the fleet it "
                            "replaces holds for the fronts still serving: %s", self.link.status)
                return
            if timeout_s is None and (self.link.status != said or time.monotonic() - said_at >= STATUS_LOG_S):
                said, said_at = self.link.status, time.monotonic()
                # A warning, as Ray's workers show by default (their processes' stderr): a front waiting is not up.
                log.warning("waiting %.0f s so far for the expert actors: %s", said_at - began, said)

    def _local_experts(self, actors: list) -> tuple[dict, dict]:
        """The (wi, wo) weights of the experts whose actors compute where this front does: on this node's CPU,
        mapped from the checkpoint when served in its dtype (the same pages the actors compute with, so they cost no
        memory), else a copy cast or quantized from them as the actors do; on this front's GPU, a copy there, each
        layer held in full stacked (the second dict, see held_experts). None unless this front computes experts."""
        if not self.config.local_experts:
            return {}, {}
        here = ray.get_runtime_context().get_node_id()
        try:
            infos = ray.get([actor.info.remote() for actor in actors], timeout=FLEET_POLL_S)
        except ray.exceptions.GetTimeoutError:  # busy: taken up again shortly, not served without these for good
            raise ExpertsUnavailable(f"the expert actors did not say where they run within {FLEET_POLL_S:g} s") \
                from None
        except Exception as e:  # lost already: taken up again at the link's next look, not served dead meanwhile
            raise ExpertsUnavailable(f"the expert actors were lost as they were taken up ({first_line(e)})") from None
        device, experts = self.front.device, self.checkpoint.config.num_experts
        keys = experts_beside(infos, here, gpu_uuid(device))
        # Those held already are kept: built again, each would be packed or quantized again while the old copies
        # still serve (as much memory again, on the fleet's every restart).
        kept = {key: self._held[key] for key in keys if key in self._held}
        new = [key for key in keys if key not in kept]
        room = self._room_for_copies(device) if new else None
        if room is not None and room < len(new):
            log.warning("the front's %s has room for a copy of %d of the %d experts beside it: their actors compute "
                        "the others", "GPU" if device.type == "cuda" else "node", room, len(new))
            new = fitting(new, room, experts)
        held, stacks = held_experts(self.checkpoint, new, self.config.quantize, self.config.packed_weights, device,
                                    self.front.dtype)
        self._held = kept | held
        self._stacks = {layer: s for layer, s in self._stacks.items()
                        if all((*layer, e) in kept for e in range(experts))} | stacks
        return self._held, self._stacks

    def _room_for_copies(self, device: torch.device) -> int | None:
        """How many more experts this front has room to copy (None: as many as it likes): on a GPU beside
        ACTIVATION_RESERVE of its memory; on the CPU beside HOST_RESERVE of the node's, where the front copies the
        experts it does not compute from the checkpoint's mapped pages (see _local_experts), and packs them."""
        config, quantize = self.checkpoint.config, self.config.quantize
        held = expert_bytes(config, expert_format(self.dtype, quantize))
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            return max(0, int((free - ACTIVATION_RESERVE * total) // held))
        mapped = quantize == "none" and self.dtype == self.checkpoint.dtype_name
        packed = self.config.packed_weights and quantize == "none" and packs(self.front.dtype)
        each = (0 if mapped else held) + (held if packed else 0)  # the packed copy is as large as the weights
        memory = host_memory()
        if not each or memory is None:
            return None
        available, total = memory
        return max(0, int((available - HOST_RESERVE * total) // each))

    @property
    def actors(self) -> list:
        """The expert actors, in placement order (none while they are not up: not yet, or lost)."""
        return self.dispatcher.actors if self.experts_ready else []

    @property
    def placement(self):
        """Which actor hosts which expert (an experts.placement.Placement), as their fleet placed them; None while
        they are not up."""
        return self.link.placement if self.experts_ready else None

    @property
    def experts_ready(self) -> bool:
        return self.link.ready.is_set()

    def check_experts(self, wait_s: float = 0.0) -> None:
        """Raise ExpertsUnavailable, saying why, unless the expert actors are up (waiting up to `wait_s`; not at all
        where the load of a fleet this object started has failed, which nothing starts again)."""
        failed_for_good = self._owns_fleet and self.link.load_error is not None
        if not self.link.wait(0.0 if failed_for_good else wait_s):
            raise ExpertsUnavailable(f"the experts are not serving: {self.link.status}")

    @property
    def tokenizer(self):
        """The tokenizer saved in the checkpoint folder (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.checkpoint.path)
            self._hidden_ids = {i for token, i in zip(self._tokenizer.all_special_tokens,
                                                      self._tokenizer.all_special_ids) if not SENTINEL.fullmatch(token)}
        return self._tokenizer

    def tokenizer_for(self, field: str):
        """The tokenizer; where the checkpoint has none, an InvalidRequest naming `field`, the one that brought text."""
        try:
            return self.tokenizer
        except InvalidRequest as e:
            raise InvalidRequest(field, e.message) from None

    def encode_text(self, text: str, field: str = "text") -> list[int]:
        check_prompt_text(text, self.config, field)
        return self.tokenizer_for(field)(text)["input_ids"]

    def generate(self, input_ids: list[list[int]] | None = None, *, texts: list[str] | None = None,
                 stop: str | Iterable[str] = (), **sampling) -> list[Sequence]:
        """Generate for a batch of prompts, given as token ids or as text (exactly one of them).
        `sampling`: SamplingParams' fields (greedy by default); with a `seed`, prompt i samples with seed + i.
        A stop string (`stop`: one, or several) ends the text before it and the tokens at the one that completed it
        (finish_reason "stop"). Each answer's `text` is set for prompts given as text, or with stop strings."""
        prompts = self._prompts(input_ids, texts)
        params = make_sampling_params(self.checkpoint.config.vocab_size, self.config, **sampling)
        stop = check_stop_strings(stop, has_tokenizer(self.checkpoint.path))
        self.check_experts(self.config.placement.restart_timeout_s)
        outputs = [Sequence(p, params.model_copy(update={"seed": nth_seed(params.seed, i)}))
                   for i, p in enumerate(prompts)]
        streams = [TextStream(self.decode, stop) for _ in outputs]
        checked = [0] * len(outputs)  # tokens looked at for stop strings, each answer's

        def end_at_stop_strings() -> None:
            """Called after every step: a stop string found ends its answer at the step's token, the one that
            completed it, and takes it out of the batch."""
            for i, (seq, text) in enumerate(zip(outputs, streams)):
                if checked[i] < len(seq.token_ids):
                    _, checked[i] = text.advance(seq.token_ids, checked[i], len(seq.token_ids), seq.done)
                    if text.stopped:
                        seq.finish_reason, seq.cancelled = "stop", True

        self._run(outputs, end_at_stop_strings if stop else None)
        if texts is not None or stop:
            for seq, text in zip(outputs, streams):
                seq.text = text.text if text.stopped else self.decode(seq.token_ids)
        return outputs

    def embed(self, input_ids: list[list[int]] | None = None, *, texts: list[str] | None = None,
              pooling: str = DEFAULT_POOLING) -> list[torch.Tensor]:
        """The encoder's output for each input, given as token ids or as text, in float32: the mean over its tokens
        ([d_model]), or with `pooling="none"` every token's ([tokens, d_model]). As transformers'
        SwitchTransformersEncoderModel's `last_hidden_state`, after the final layer norm."""
        prompts = self._prompts(input_ids, texts)
        check_pooling(pooling)
        self.check_experts(self.config.placement.restart_timeout_s)
        sequences = self._run([Sequence(p, pooling=pooling) for p in prompts])
        # Copies made here, out of inference mode: tensors a caller may train on (an inference tensor cannot be saved
        # for backward), each its own (not a view of its encoder pass's padded batch).
        return [s.embedding.clone() for s in sequences]

    def _run(self, sequences: list[Sequence], after_step: Callable[[], None] | None = None) -> list[Sequence]:
        with self._stepping:
            return run_to_completion(self.batcher, sequences, after_step)

    def _prompts(self, input_ids: list[list[int]] | None, texts: list[str] | None) -> list[list[int]]:
        """Checked prompts from token ids or texts (exactly one of them)."""
        if input_ids is not None and texts is not None:
            raise InvalidRequest("texts", "give input_ids or texts, not both")
        vocab = self.checkpoint.config.vocab_size
        if texts is not None:
            if not is_list(texts):
                raise InvalidRequest("texts", f"a list of prompts, got {type(texts).__name__}")
            if not (texts := list(texts)):
                raise InvalidRequest("texts", "at least one prompt is needed")
            tokenizer = self.tokenizer_for("texts")
            return [text_prompt_ids(tokenizer, t, vocab, self.config, f"texts[{i}]") for i, t in enumerate(texts)]
        if input_ids is None:
            raise InvalidRequest("input_ids", "give input_ids or texts")
        if not is_list(input_ids):
            raise InvalidRequest("input_ids", f"a list of prompts, got {type(input_ids).__name__}")
        input_ids = list(input_ids)
        if not input_ids:
            raise InvalidRequest("input_ids", "at least one prompt is needed")
        return [check_prompt(ids, vocab, self.config, f"input_ids[{i}]") for i, ids in enumerate(input_ids)]

    @property
    def hidden_ids(self) -> set[int]:
        """The special tokens that `decode` leaves out."""
        _ = self.tokenizer
        return self._hidden_ids

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated tokens: special tokens left out, except T5's sentinels (`<extra_id_N>`), which mark
        the spans a span-filling answer fills."""
        return self.decode_many([token_ids])[0]

    def decode_many(self, token_id_lists: list[list[int]]) -> list[str]:
        """`decode` of each list. A fast tokenizer decodes them all in one call that releases the GIL (an answer's
        logprobs decode thousands of lists, which one by one held the batching thread and the event loop)."""
        tokenizer = self.tokenizer
        shown = [[t for t in ids if t not in self._hidden_ids] for ids in token_id_lists]
        # Without clean-up of spaces (transformers' default, which a tokenizer's config may override): it changes
        # text already decoded as tokens follow (" !" to "!"), and a stream cannot take back what it has sent.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.decode_batch(shown, skip_special_tokens=False)
        return [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in shown]

    def expert_token_counts(self) -> dict[tuple[str, int], list[int]]:
        """Tokens each expert of each sparse layer has computed since its actor started, counted by the actors
        (so every front that shares them is included), and by this front where it computed them itself."""
        return count_expert_tokens(self._ask_actors("token_counts") + [self.dispatcher.local_tokens],
                                   self.checkpoint.config.num_experts)

    def actor_info(self) -> list[dict]:
        return self._ask_actors("info")

    def _ask_actors(self, method: str) -> list:
        """Every expert actor's answer to `method`, waited for as long as a step waits for actors that are down."""
        timeout_s = self.config.placement.restart_timeout_s
        self.check_experts(timeout_s)  # lost ones, or none yet: their successors' answers, not a dead one's error
        try:
            return ray.get([getattr(actor, method).remote() for actor in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ExpertsUnavailable(f"the expert actors did not answer within {timeout_s:g} s "
                                     "(placement.restart_timeout_s)") from None

    def shutdown(self) -> None:
        """Stop the fleet this object started (one it was given stays for the other fronts), and Ray if it started
        it."""
        if self.link is not None:
            self.link.close()
        if self.fleet is not None and self._owns_fleet:
            stop_fleet(self.fleet)
        self.fleet = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> SwitchCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
