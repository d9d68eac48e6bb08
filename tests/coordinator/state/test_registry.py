"""The registry's derived indexes (by lease, by type): kept by put and
remove, rebuilt from a snapshot's rows, never in the rows themselves."""

from __future__ import annotations

from coordinator.state.registry import Agent, Registry


def agent(agent_id: str, agent_type: str, lease_id: int) -> Agent:
    return Agent(agent_id, agent_type, {}, 30_000, None, 1, lease_id, "healthy", 0)


def test_the_type_and_lease_indexes_follow_put_replace_and_remove() -> None:
    registry = Registry()
    registry.put(agent("a", "worker", 1))
    registry.put(agent("b", "worker", 2))
    registry.put(agent("c", "planner", 3))
    assert sorted(a.id for a in registry.of_type("worker")) == ["a", "b"]
    registry.put(agent("a", "planner", 4))  # registered again, as another type, with a new lease
    assert [a.id for a in registry.of_type("worker")] == ["b"]
    assert [a.id for a in registry.by_type("planner")] == ["a", "c"]
    assert registry.by_lease(1) is None and registry.by_lease(4).id == "a"
    registry.remove("b")
    assert registry.of_type("worker") == [] and registry.by_type("worker") == []
    assert "worker" not in registry._by_type  # an emptied type leaves nothing behind
    assert [a.id for a in registry.by_type(None)] == ["a", "c"]


def test_a_restored_registry_has_the_same_indexes() -> None:
    registry = Registry()
    for i in range(50):
        registry.put(agent(f"a{i}", f"t{i % 3}", 100 + i))
    restored = Registry.from_data(registry.to_data())
    for t in ("t0", "t1", "t2"):
        assert sorted(a.id for a in restored.of_type(t)) == sorted(a.id for a in registry.of_type(t))
    assert restored.by_lease(142).id == "a42"
    assert restored.bytes == registry.bytes
