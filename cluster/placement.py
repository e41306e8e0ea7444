"""Placement: which actor gets which GPUs, CPUs and node, checked before anything starts.

    request = request_from_config(config.cluster, config.rollout)
    plan_ = plan(request, cluster_nodes())          # PlacementError if it cannot fit
    pg = create_placement_group(plan_)
    Learner = ray.remote(Learner).options(**scheduling_for(plan_, pg, "learner", 0))

The planner is pure (no Ray import at module level) and simulates what Ray will do, so a run
that cannot fit fails at once, with a message naming the role, what it asked for and what each
node has, instead of hanging on a placement group that never becomes ready.

Rules (the planner's model of Ray's GPU accounting):

- An actor with ``gpus`` in (0, 1) takes a fraction of one card. Fractional actors are packed
  onto cards first-fit decreasing; they share a card only when their fractions sum to <= 1.
  All the actors on one card form one bundle ``{"GPU": sum, "CPU": sum}``, so Ray gives them the
  same physical card (a bundle's fractional GPU comes from a single card). First-fit also means
  no two of those bundles could fit on one card together, so the plan's sharing is Ray's.
- An actor with a whole ``gpus`` k >= 1 gets its own bundle of k whole cards on one node.
- An actor with no GPU gets a bundle of its CPUs; one that asks for nothing gets no bundle.
- Bundles go to nodes by ``strategy``: PACK fills nodes already in use first, SPREAD takes the
  node with the fewest bundles, STRICT_PACK needs one node for everything, STRICT_SPREAD one node
  per bundle. The largest bundles are placed first. Each bundle is then pinned to its planned
  node with a label selector, so actors land where the plan says.
- The plan is checked against the nodes' *total* resources; resources held by other jobs show
  up as a placement group that is not ready within ``timeout_s`` (a :class:`PlacementError`).

Card numbers in a plan are positions among a node's cards, not CUDA ids; what the plan
guarantees is which actors share a card, which picks the weight-sync transport: the same card
-> ``ipc`` (NCCL cannot put two ranks on one device), different GPUs -> ``nccl``, a CPU end ->
``gloo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["RoleRequest", "PlacementRequest", "NodeResources", "ActorPlacement", "Plan",
           "PlacementError", "make_request", "request_from_config", "plan", "cluster_nodes",
           "create_placement_group", "scheduling_for", "MEMORY_MARGIN", "WHOLE_CARD_MEMORY"]

ROLES = ("learner", "rollout", "verifier")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
VERIFIER_CPUS = 1.0  # make_request's default; the config's cluster.cpus_per_verifier overrides it
# vLLM's gpu_memory_utilization caps the share of the card's *total* memory its instance takes.
# Ray's GPU fractions are only bookkeeping: the learner on the same card allocates freely, and
# each process also needs its own CUDA context and NCCL/IPC buffers. So a fractional engine
# gets its share minus this margin (0.5 -> 0.45); a whole card gets vLLM's own default.
MEMORY_MARGIN = 0.05
WHOLE_CARD_MEMORY = 0.9
NODE_LABEL = "ray.io/node-id"  # the label every Ray node carries; bundles are pinned with it
_EPS = 1e-9


class PlacementError(ValueError):
    """The request does not fit the cluster (or is malformed); the message says why."""


# --------------------------------------------------------------------------- requests and nodes
@dataclass(frozen=True)
class RoleRequest:
    """``count`` actors of one role, each asking for ``gpus`` (a fraction <= 1 or a whole
    number) and ``cpus``."""

    role: str
    count: int
    gpus: float = 0.0
    cpus: float = 1.0

    def __post_init__(self):
        if self.role not in ROLES:
            raise PlacementError(f"unknown role {self.role!r}; roles: {', '.join(ROLES)}")
        if self.count < 0 or self.gpus < 0 or self.cpus < 0:
            raise PlacementError(f"{self.role}: count, gpus and cpus must be >= 0, got {self}")
        if self.gpus > 1 and abs(self.gpus - round(self.gpus)) > _EPS:
            raise PlacementError(f"{self.role}: {self.gpus:g} GPUs per actor; above 1 a GPU "
                                 "count must be whole (a fraction <= 1 shares one card)")

    def describe(self) -> str:
        return f"{self.role} {self.count} x ({self.gpus:g} GPU, {self.cpus:g} CPU)"


@dataclass(frozen=True)
class PlacementRequest:
    """Every role's request and the Ray placement strategy."""

    roles: tuple[RoleRequest, ...]
    strategy: str = "PACK"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise PlacementError(f"unknown strategy {self.strategy!r}; strategies: {', '.join(STRATEGIES)}")
        names = [r.role for r in self.roles]
        if len(set(names)) != len(names):
            raise PlacementError(f"each role at most once, got {names}")

    def describe(self) -> str:
        return "; ".join(r.describe() for r in self.roles if r.count) + f"; strategy {self.strategy}"


@dataclass(frozen=True)
class NodeResources:
    """One alive node's total resources."""

    node_id: str
    ip: str
    cpus: float
    gpus: float

    @property
    def cards(self) -> int:
        return int(self.gpus + _EPS)

    def describe(self) -> str:
        return f"node {self.node_id[:8]} ({self.ip}): {self.cpus:g} CPU, {self.gpus:g} GPU"


def make_request(*, num_learners: int, learner_gpus: float, num_engines: int,
                 rollout_gpus_per_engine: float, num_verifiers: int, cpus_per_learner: float = 1.0,
                 cpus_per_engine: float = 1.0, cpus_per_verifier: float = VERIFIER_CPUS,
                 strategy: str = "PACK") -> PlacementRequest:
    """A request from flat values."""
    return PlacementRequest((RoleRequest("learner", num_learners, learner_gpus, cpus_per_learner),
                             RoleRequest("rollout", num_engines, rollout_gpus_per_engine, cpus_per_engine),
                             RoleRequest("verifier", num_verifiers, 0.0, cpus_per_verifier)), strategy)


def request_from_config(cluster, rollout) -> PlacementRequest:
    """A request from the ``cluster`` and ``rollout`` config sections."""
    return make_request(num_learners=cluster.num_learners, learner_gpus=cluster.learner_gpus,
                        num_engines=rollout.num_engines,
                        rollout_gpus_per_engine=cluster.rollout_gpus_per_engine,
                        num_verifiers=cluster.num_verifiers, cpus_per_learner=cluster.cpus_per_learner,
                        cpus_per_engine=cluster.cpus_per_engine, cpus_per_verifier=cluster.cpus_per_verifier,
                        strategy=cluster.placement_strategy)


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ActorPlacement:
    """Where one actor goes: its bundle, node and cards (positions among the node's cards)."""

    role: str
    index: int
    gpus: float
    cpus: float
    bundle: Optional[int]
    node_id: Optional[str]
    cards: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.role}:{self.index}"


@dataclass(frozen=True)
class Plan:
    """Bundles for one placement group and every actor's place in it."""

    strategy: str
    bundles: tuple[dict, ...]          # {"CPU": x, "GPU": y} per bundle, Ray's order
    bundle_nodes: tuple[str, ...]      # the node id each bundle is pinned to
    actors: tuple[ActorPlacement, ...]
    nodes: tuple[NodeResources, ...]

    def actor(self, role: str, index: int) -> ActorPlacement:
        for a in self.actors:
            if (a.role, a.index) == (role, index):
                return a
        raise KeyError(f"no {role}:{index} in the plan; actors: {[a.name for a in self.actors]}")

    @property
    def shared_cards(self) -> tuple[tuple[str, ...], ...]:
        """Names of the actors on each card that holds more than one, e.g. (("learner:0", "rollout:0"),)."""
        cards: dict[tuple, list[str]] = {}
        for a in self.actors:
            for c in a.cards:
                cards.setdefault((a.node_id, c), []).append(a.name)
        return tuple(tuple(v) for v in cards.values() if len(v) > 1)

    def transport(self, engine: int, requested: str = "auto", learner: int = 0) -> str:
        """The weight-sync transport between ``learner`` and rollout ``engine``: ipc (same card),
        nccl (different GPUs); with either end on CPU the object store on one node (shared
        memory: about 3x faster than gloo over loopback, results/bench_weight_sync.json) and gloo
        across nodes. An explicit ``requested`` transport is returned when the layout allows
        it, else PlacementError."""
        a, b = self.actor("learner", learner), self.actor("rollout", engine)
        if not a.cards or not b.cards:
            auto = "object_store" if a.node_id == b.node_id else "gloo"
        else:
            auto = "ipc" if a.node_id == b.node_id and set(a.cards) & set(b.cards) else "nccl"
        if requested in ("auto", auto) or requested in ("gloo", "object_store"):
            return auto if requested == "auto" else requested
        why = {"ipc": "CUDA IPC needs both on one card", "nccl": "NCCL needs two GPUs at different cards"}
        raise PlacementError(f"weight sync {requested!r} between {a.name} and {b.name} is impossible: "
                             f"{why.get(requested, 'unknown transport')}; the plan puts them "
                             f"{_where(a)} and {_where(b)} (auto would pick {auto!r})")

    def gpu_memory_utilization(self, engine: int, explicit: Optional[float] = None) -> Optional[float]:
        """vLLM's memory fraction for rollout ``engine``: ``explicit`` when set, else its card share
        minus MEMORY_MARGIN (WHOLE_CARD_MEMORY with whole cards); None on CPU."""
        g = self.actor("rollout", engine).gpus
        if g == 0:
            return None
        if explicit is not None:
            if not 0 < explicit <= min(g, 1.0):
                raise PlacementError(f"gpu_memory_utilization {explicit:g} for rollout:{engine} is "
                                     f"outside (0, {min(g, 1.0):g}], the engine's share of its card")
            return explicit
        if g >= 1:
            return WHOLE_CARD_MEMORY
        if g <= 2 * MEMORY_MARGIN:
            raise PlacementError(f"rollout:{engine} has {g:g} of a card, too little for vLLM after the "
                                 f"{MEMORY_MARGIN:g} safety margin; give it more or set the fraction explicitly")
        return round(g - MEMORY_MARGIN, 4)

    def describe(self) -> str:
        """One line per bundle: where it goes and who is in it."""
        lines = [f"placement ({self.strategy}), {len(self.bundles)} bundles:"]
        for i, (b, n) in enumerate(zip(self.bundles, self.bundle_nodes)):
            who = ", ".join(a.name for a in self.actors if a.bundle == i)
            lines.append(f"  bundle {i} {b} on {next(x for x in self.nodes if x.node_id == n).describe()}: {who}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- planning
@dataclass
class _Unit:
    """A future bundle: its actors (indices into the actor list), whole cards, GPU and CPU sums."""

    members: list[int]
    cards: int
    gpu: float
    cpu: float


def plan(request: PlacementRequest, nodes: Sequence[NodeResources]) -> Plan:
    """Assign every actor a bundle and a node, or raise PlacementError saying what does not fit."""
    nodes = tuple(nodes)
    if not nodes:
        raise PlacementError("the cluster has no alive nodes")
    actors = [(r.role, i, r.gpus, r.cpus) for r in request.roles for i in range(r.count)]
    units = _units(actors)
    _check_totals(request, nodes, units, actors)
    placed = _assign(units, nodes, request, actors)
    out = [ActorPlacement(role, i, g, c, None, None, ()) for role, i, g, c in actors]
    for b, (u, (node, cards)) in enumerate(zip(units, placed)):
        for m in u.members:
            role, i, g, c = actors[m]
            out[m] = ActorPlacement(role, i, g, c, b, nodes[node].node_id, cards)
    bundles = tuple({k: round(v, 4) for k, v in (("CPU", u.cpu), ("GPU", u.gpu)) if v > 0} for u in units)
    return Plan(request.strategy, bundles, tuple(nodes[n].node_id for n, _ in placed), tuple(out), nodes)


def _units(actors) -> list[_Unit]:
    """One unit per whole-GPU actor, per CPU-only actor, and per card of fractional actors
    (first-fit decreasing); units keep the order of their first actor."""
    frac = sorted((k for k, a in enumerate(actors) if 0 < a[2] < 1 - _EPS), key=lambda k: -actors[k][2])
    groups: list[list[int]] = []
    for k in frac:
        g = next((g for g in groups if sum(actors[m][2] for m in g) + actors[k][2] <= 1 + _EPS), None)
        if g is None:
            groups.append([k])
        else:
            g.append(k)
    group_of = {k: g for g in groups for k in g}
    units, seen = [], set()
    for k, (_, _, gpus, cpus) in enumerate(actors):
        if k in group_of:
            g = group_of[k]
            if id(g) not in seen:
                seen.add(id(g))
                units.append(_Unit(sorted(g), 1, sum(actors[m][2] for m in g), sum(actors[m][3] for m in g)))
        elif gpus > 0 or cpus > 0:
            units.append(_Unit([k], int(round(gpus)), gpus, cpus))
    return units


def _check_totals(request, nodes, units, actors) -> None:
    """Clear errors for what cannot fit whatever the packing: one actor larger than every node,
    more cards or CPUs in all than the cluster has."""
    most_cards, most_cpus = max(n.cards for n in nodes), max(n.cpus for n in nodes)
    for r in request.roles:
        if r.count and r.gpus > 1 and r.gpus > most_cards:
            raise _fail(f"{r.role} does not fit: each asks for {r.gpus:g} whole GPUs on one node; "
                        f"the largest node has {most_cards}", request, nodes)
        if r.count and r.cpus > most_cpus + _EPS:
            raise _fail(f"{r.role} does not fit: each asks for {r.cpus:g} CPUs on one node; "
                        f"the largest node has {most_cpus:g}", request, nodes)
    need, have = sum(u.cards for u in units), sum(n.cards for n in nodes)
    if need > have:
        raise _fail(f"GPUs do not fit: {_gpu_roles(request)} need {need} cards, the cluster has {have}"
                    + _share_hint(units, actors, have), request, nodes)
    cpus = sum(u.cpu for u in units)
    if cpus > sum(n.cpus for n in nodes) + _EPS:
        per_role = ", ".join(f"{r.role} {r.count * r.cpus:g}" for r in request.roles if r.count * r.cpus)
        raise _fail(f"CPUs do not fit: the roles ask for {cpus:g} CPUs ({per_role}), the cluster has "
                    f"{sum(n.cpus for n in nodes):g}", request, nodes)


def _assign(units, nodes, request, actors) -> list[tuple[int, tuple[int, ...]]]:
    """(node index, cards) per unit, placing the largest units first."""
    strategy = request.strategy
    if strategy == "STRICT_SPREAD" and len(units) > len(nodes):
        raise _fail(f"STRICT_SPREAD needs one node per bundle: {len(units)} bundles, {len(nodes)} nodes",
                    request, nodes)
    if strategy == "STRICT_PACK":
        for only in range(len(nodes)):
            placed = _try_assign(units, nodes, strategy, allowed={only})
            if isinstance(placed, list):
                return placed
        need = f"{sum(u.cards for u in units)} GPU, {sum(u.cpu for u in units):g} CPU"
        raise _fail(f"STRICT_PACK needs one node with {need}; no node has that", request, nodes)
    placed = _try_assign(units, nodes, strategy, allowed=set(range(len(nodes))))
    if isinstance(placed, list):
        return placed
    u, free_cpu, free_cards = placed
    who = " + ".join(f"{actors[m][0]}:{actors[m][1]}" for m in u.members)
    free = "; ".join(f"{n.node_id[:8]} {c:g} CPU, {len(f)} GPU" for n, c, f in zip(nodes, free_cpu, free_cards))
    raise _fail(f"{who} ({u.gpu:g} GPU, {u.cpu:g} CPU) does not fit on any node with {strategy} "
                f"after the larger bundles were placed (free per node: {free})", request, nodes)


def _try_assign(units, nodes, strategy, allowed):
    """The placement as a list, or (failed unit, free CPUs, free cards) when one does not fit."""
    free_cpu = [n.cpus for n in nodes]
    free_cards = [list(range(n.cards)) for n in nodes]
    count = [0] * len(nodes)
    placed: list = [None] * len(units)
    for k in sorted(range(len(units)), key=lambda k: (-units[k].cards, -units[k].cpu)):
        u = units[k]
        fits = [i for i in sorted(allowed) if len(free_cards[i]) >= u.cards and free_cpu[i] + _EPS >= u.cpu]
        if strategy == "STRICT_SPREAD":
            fits = sorted((i for i in fits if count[i] == 0), key=lambda i: (nodes[i].cards, nodes[i].cpus))
        elif strategy == "SPREAD":
            fits = sorted(fits, key=lambda i: count[i])
        elif strategy == "PACK":
            fits = sorted(fits, key=lambda i: count[i] == 0)
        if not fits:
            return u, free_cpu, free_cards
        i = fits[0]
        cards, free_cards[i] = tuple(free_cards[i][:u.cards]), free_cards[i][u.cards:]
        free_cpu[i] -= u.cpu
        count[i] += 1
        placed[k] = (i, cards)
    return placed


# --------------------------------------------------------------------------- messages
def _fail(problem: str, request: PlacementRequest, nodes) -> PlacementError:
    return PlacementError(f"{problem}.\n  asked:   {request.describe()}\n  cluster: "
                          + "; ".join(n.describe() for n in nodes))


def _gpu_roles(request) -> str:
    return " + ".join(f"{r.role} {r.count} x {r.gpus:g} GPU" for r in request.roles if r.count and r.gpus) or "nothing"


def _share_hint(units, actors, have) -> str:
    cards = [" + ".join(f"{actors[m][0]}:{actors[m][1]} {actors[m][2]:g}" for m in u.members)
             for u in units if 0 < u.gpu < 1 + _EPS and u.cards == 1]
    if any(0 < a[2] < 1 for a in actors):
        return f" (fractions share a card only when they sum to at most 1; cards: [{'], ['.join(cards)}])"
    if have >= 1:
        return " (to share one card, give fractions summing to <= 1, e.g. learner 0.5 and rollout 0.5)"
    return ""


def _where(a: ActorPlacement) -> str:
    return f"on node {a.node_id[:8]} card {list(a.cards)}" if a.cards else "on CPU"


# --------------------------------------------------------------------------- Ray
def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the connected Ray cluster with their total CPUs and GPUs."""
    import ray

    return [NodeResources(n["NodeID"], n["NodeManagerAddress"], float(n["Resources"].get("CPU", 0.0)),
                          float(n["Resources"].get("GPU", 0.0))) for n in ray.nodes() if n["Alive"]]


def create_placement_group(plan_: Plan, timeout_s: float = 60.0, name: str = ""):
    """Reserve the plan's bundles, each pinned to its planned node; PlacementError if the group is
    not ready within ``timeout_s`` (the group is then removed, so nothing stays reserved)."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    if not plan_.bundles:
        raise PlacementError("the plan reserves nothing: every actor asks for 0 CPUs and 0 GPUs")
    pg = placement_group(list(plan_.bundles), strategy=plan_.strategy, name=name,
                         bundle_label_selector=[{NODE_LABEL: n} for n in plan_.bundle_nodes])
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        raise PlacementError(f"the placement group was not ready after {timeout_s:g}s: other jobs may "
                             f"hold the resources, or a node left.\n{plan_.describe()}")
    actual = placement_group_table(pg)["bundles_to_node_id"]
    wrong = [i for i, n in enumerate(plan_.bundle_nodes) if actual.get(i) != n]
    if wrong:  # label pinning ignored (an older Ray): the plan's sharing would not hold
        remove_placement_group(pg)
        raise PlacementError(f"Ray placed bundles {wrong} elsewhere than planned ({actual})")
    return pg


def scheduling_for(plan_: Plan, pg, role: str, index: int) -> dict:
    """Keyword arguments for ``ActorClass.options(...)`` that put this actor in its bundle."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    a = plan_.actor(role, index)
    opts: dict = {"num_cpus": a.cpus, "num_gpus": a.gpus}
    if a.bundle is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=a.bundle)
    return opts
