"""Placement plans: pure planner cases, then the plans on real local Ray clusters with logical GPUs."""

from __future__ import annotations

import re

import pytest

from cluster.placement import (
    NodeResources, PlacementError, PlacementRequest, RoleRequest, create_placement_group, cluster_nodes,
    make_request, plan, request_from_config, scheduling_for,
)


def node(name: str, cpus: float, gpus: float) -> NodeResources:
    return NodeResources(name, "10.0.0." + name[-1], cpus, gpus)


def req(learners=1, lg=0.0, engines=1, rg=0.0, verifiers=2, cl=1.0, ce=1.0, strategy="PACK"):
    return make_request(num_learners=learners, learner_gpus=lg, num_engines=engines,
                        rollout_gpus_per_engine=rg, num_verifiers=verifiers, cpus_per_learner=cl,
                        cpus_per_engine=ce, strategy=strategy)


def on(p, node_id):
    return sorted(a.name for a in p.actors if a.node_id == node_id and a.gpus)


# --------------------------------------------------------------------------- pure planner
def test_one_card_shared_half_and_half():
    p = plan(req(lg=0.5, rg=0.5), [node("n1", 4, 1)])
    assert p.bundles == ({"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0})
    learner, engine = p.actor("learner", 0), p.actor("rollout", 0)
    assert learner.bundle == engine.bundle == 0 and learner.cards == engine.cards == (0,)
    assert p.shared_cards == (("learner:0", "rollout:0"),)
    assert p.transport(0) == "ipc"
    assert p.gpu_memory_utilization(0) == 0.45          # 0.5 share - 0.05 margin
    assert p.gpu_memory_utilization(0, explicit=0.4) == 0.4
    with pytest.raises(PlacementError, match="share of its card"):
        p.gpu_memory_utilization(0, explicit=0.6)
    with pytest.raises(PlacementError, match="NCCL"):
        p.transport(0, requested="nccl")


def test_learner_and_three_rollout_gpus():
    p = plan(req(lg=1, engines=3, rg=1), [node("n1", 8, 4)])
    assert [b.get("GPU") for b in p.bundles[:4]] == [1, 1, 1, 1]
    assert sorted(c for a in p.actors for c in a.cards) == [0, 1, 2, 3]
    assert p.shared_cards == ()
    assert [p.transport(i) for i in range(3)] == ["nccl"] * 3
    assert p.gpu_memory_utilization(2) == 0.9
    with pytest.raises(PlacementError, match="IPC"):
        p.transport(1, requested="ipc")


def test_the_multinode_config_plans_on_two_four_gpu_nodes():
    from cluster.build import weight_sync_transport
    from rl.config import load_config

    config = load_config("configs/multinode_2x4.yaml")
    p = plan(request_from_config(config.cluster, config.rollout), [node("n1", 16, 4), node("n2", 16, 4)])
    assert len(on(p, "n1")) == len(on(p, "n2")) == 4
    assert weight_sync_transport(p, config.rollout.num_engines, config.cluster.weight_sync) == "nccl"
    with pytest.raises(PlacementError):
        plan(request_from_config(config.cluster, config.rollout), [node("n1", 16, 4)])


def test_two_nodes_four_gpus_each():
    nodes = [node("h0", 2, 0), node("w1", 4, 4), node("w2", 4, 4)]
    p = plan(req(learners=2, lg=1, engines=6, rg=1, cl=0.5, ce=0.5), nodes)
    assert len(on(p, "w1")) == len(on(p, "w2")) == 4 and on(p, "h0") == []
    spread = plan(req(learners=2, lg=1, engines=2, rg=1, strategy="SPREAD"), nodes)
    assert len(on(spread, "w1")) == len(on(spread, "w2")) == 2
    tp = plan(req(lg=1, engines=3, rg=2), nodes)  # a 2-GPU engine takes two cards of one node
    assert all(len(a.cards) == 2 for a in tp.actors if a.role == "rollout")
    with pytest.raises(PlacementError, match="STRICT_PACK needs one node with 8 GPU"):
        plan(req(learners=2, lg=1, engines=6, rg=1, strategy="STRICT_PACK"), nodes)


def test_request_that_does_not_fit_names_role_ask_and_nodes():
    nodes = [node("h0", 2, 0), node("w1", 4, 4), node("w2", 4, 4)]
    with pytest.raises(PlacementError) as e:
        plan(req(lg=1, engines=2, rg=8), nodes)
    msg = str(e.value)
    assert "rollout does not fit: each asks for 8 whole GPUs on one node; the largest node has 4" in msg
    assert "rollout 2 x (8 GPU, 1 CPU)" in msg                      # what it asked for
    assert all(f"node {n} (10.0.0.{n[-1]}): 4 CPU, 4 GPU" in msg for n in ("w1", "w2"))  # per node
    with pytest.raises(PlacementError, match=r"learner 1 x 1 GPU \+ rollout 8 x 1 GPU need 9 cards, the cluster has 8"):
        plan(req(lg=1, engines=8, rg=1), nodes)
    with pytest.raises(PlacementError, match="to share one card"):
        plan(req(lg=1, rg=1), [node("n1", 4, 1)])


def test_cpu_only_run():
    p = plan(req(), [node("n1", 4, 0)])
    assert all("GPU" not in b for b in p.bundles) and p.shared_cards == ()
    assert p.transport(0) == "object_store" and p.transport(0, requested="gloo") == "gloo"
    spread = plan(req(cl=3, ce=3), [node("n1", 4, 0), node("n2", 4, 0)])  # no node holds both
    assert spread.actor("learner", 0).node_id != spread.actor("rollout", 0).node_id
    assert spread.transport(0) == "gloo"
    assert p.gpu_memory_utilization(0) is None
    with pytest.raises(PlacementError, match="GPUs do not fit.*need 1 cards, the cluster has 0"):
        plan(req(rg=1), [node("n1", 4, 0)])


def test_fractions_that_do_not_sum_to_one_card():
    with pytest.raises(PlacementError, match=re.escape("cards: [learner:0 0.6], [rollout:0 0.5]")):
        plan(req(lg=0.6, rg=0.5), [node("n1", 4, 1)])
    p = plan(req(lg=0.6, rg=0.5), [node("n1", 4, 2)])
    assert p.shared_cards == () and p.transport(0) == "nccl"
    with pytest.raises(PlacementError, match="need 2 cards, the cluster has 1"):
        plan(req(lg=0.5, engines=3, rg=0.25), [node("n1", 8, 1)])  # 0.5 + 3 x 0.25 > 1
    four = plan(req(lg=0.5, engines=2, rg=0.25), [node("n1", 8, 1)])
    assert four.shared_cards == (("learner:0", "rollout:0", "rollout:1"),)
    assert four.gpu_memory_utilization(1) == 0.2


def test_more_verifiers_than_cpus():
    with pytest.raises(PlacementError, match=r"CPUs do not fit: .* 10 CPUs \(learner 1, rollout 1, verifier 8\)"):
        plan(req(verifiers=8), [node("n1", 4, 0)])


def test_packing_failure_names_the_actor_and_free_resources():
    # 6 CPUs in all, but no node has the 3 that one learner needs next to its GPU
    with pytest.raises(PlacementError, match="does not fit: each asks for 3 CPUs"):
        plan(req(lg=1, cl=3, engines=1, verifiers=0), [node("a1", 2, 1), node("b2", 2, 1), node("c3", 2, 0)])
    with pytest.raises(PlacementError, match=r"rollout:0 \(1 GPU, 2 CPU\) does not fit .*free per node: a1 1 CPU, 0 GPU; b2 1 CPU, 1 GPU"):
        plan(req(lg=1, cl=2, engines=1, rg=1, ce=2, verifiers=0, strategy="PACK"),
             [node("a1", 3, 1), node("b2", 1, 1)])


def test_strict_spread_and_malformed_requests():
    nodes = [node("a1", 2, 1), node("b2", 2, 1)]
    p = plan(req(lg=1, rg=1, verifiers=0, strategy="STRICT_SPREAD"), nodes)
    assert {p.actor("learner", 0).node_id, p.actor("rollout", 0).node_id} == {"a1", "b2"}
    with pytest.raises(PlacementError, match="one node per bundle: 4 bundles, 2 nodes"):
        plan(req(lg=1, rg=1, strategy="STRICT_SPREAD"), nodes)
    with pytest.raises(PlacementError, match="must be whole"):
        RoleRequest("rollout", 1, 1.5)
    with pytest.raises(PlacementError, match="unknown strategy"):
        PlacementRequest((), "BEST")


def test_request_from_config():
    from rl.config import load_config

    c = load_config(None, ["cluster.learner_gpus=0.5", "cluster.rollout_gpus_per_engine=0.5",
                           "rollout.engine=vllm", "cluster.num_verifiers=3", "cluster.cpus_per_verifier=0.5"])
    r = request_from_config(c.cluster, c.rollout)
    assert [(x.role, x.count, x.gpus, x.cpus) for x in r.roles] == [
        ("learner", 1, 0.5, 1.0), ("rollout", 1, 0.5, 1.0), ("verifier", 3, 0.0, 0.5)]
    assert plan(r, [node("n1", 5, 1)]).transport(0) == "ipc"


# --------------------------------------------------------------------------- real Ray
class Probe:
    def where(self):
        import ray

        return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


def start(ray, p, pg, role, index):
    return ray.remote(Probe).options(**scheduling_for(p, pg, role, index)).remote()


@pytest.fixture(scope="class")
def one_card():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
class TestOneLogicalGpu:
    def test_learner_and_engine_share_the_card(self, one_card):
        ray = one_card
        p = plan(req(lg=0.5, rg=0.5, verifiers=1), cluster_nodes())
        pg = create_placement_group(p, timeout_s=30)
        try:
            probes = [start(ray, p, pg, "learner", 0), start(ray, p, pg, "rollout", 0)]
            (n1, g1), (n2, g2) = ray.get([a.where.remote() for a in probes], timeout=60)
            assert g1 == g2 and len(g1) == 1 and n1 == n2 == p.actor("learner", 0).node_id
            # the card is taken: a second group for the same plan is refused, then removed
            with pytest.raises(PlacementError, match="not ready after 1s"):
                create_placement_group(p, timeout_s=1)
        finally:
            ray.util.remove_placement_group(pg)
        assert sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values()) == 0


@pytest.fixture(scope="class")
def two_nodes():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield ray
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
class TestTwoNodesFourGpus:
    def test_actors_land_where_the_plan_says(self, two_nodes):
        ray = two_nodes
        nodes = cluster_nodes()
        assert sorted(n.gpus for n in nodes) == [0, 4, 4]
        p = plan(req(learners=2, lg=1, engines=6, rg=1, cl=0.25, ce=0.25, verifiers=1), nodes)
        pg = create_placement_group(p, timeout_s=60)
        try:
            actors = [(a, start(ray, p, pg, a.role, a.index)) for a in p.actors]
            where = ray.get([h.where.remote() for _, h in actors], timeout=120)
            for (a, _), (node_id, gpus) in zip(actors, where):
                assert node_id == a.node_id, a.name
                assert len(gpus) == (1 if a.gpus else 0)
            gpu_nodes = {a.node_id for a in p.actors if a.gpus}
            assert len(gpu_nodes) == 2                           # 8 GPUs take both workers
            per_node = {(n, g[0]) for (a, _), (n, g) in zip(actors, where) if g}
            assert len(per_node) == 8                            # 8 distinct cards
        finally:
            ray.util.remove_placement_group(pg)

    def test_impossible_request_fails_before_anything_starts(self, two_nodes):
        ray = two_nodes
        before = len(ray.util.placement_group_table())
        with pytest.raises(PlacementError, match=r"need 9 cards, the cluster has 8.*\n.*\n  cluster: .*4 GPU"):
            plan(req(lg=1, engines=8, rg=1), cluster_nodes())
        assert len(ray.util.placement_group_table()) == before

    def test_bundles_are_pinned_to_the_planned_node(self, two_nodes):
        ray = two_nodes
        for worker in [n for n in cluster_nodes() if n.gpus]:  # Ray alone would pick one of them for both
            p = plan(req(lg=1, engines=0, verifiers=0), [worker])
            pg = create_placement_group(p, timeout_s=30)       # raises if a bundle lands elsewhere
            try:
                assert ray.util.placement_group_table(pg)["bundles_to_node_id"] == {0: worker.node_id}
            finally:
                ray.util.remove_placement_group(pg)
