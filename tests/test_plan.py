from collections import Counter

from fillup_data.index import SourceIndex
from fillup_data.plan import group_of, make_plan, sample_seed, synthetic_counts
from fillup_data.recipe import GroupsConfig, parse_recipe
from fillup_data.sources import SourceItem


def fake_index(counts, test=2):
    items = {"train": [SourceItem("train", c, f"t/{c}/{i}", "") for c, n in enumerate(counts) for i in range(n)],
             "test": [SourceItem("test", c, f"v/{c}/{i}", "") for c in range(len(counts)) for i in range(test)]}
    return SourceIndex([f"c{i}" for i in range(len(counts))], items)


def recipe(**over):
    d = {"name": "p", "source": {"kind": "demo"}, "fill": {"policy": "fill_to", "target": 30},
         "generator": {"strategy": "textual_inversion"},
         "inversion": {"steps_per_image": 10, "min_steps": 30, "max_steps": 100, "checkpoint_every": 10},
         "shards": {"max_samples": 16}}
    d.update(over)
    return parse_recipe(d)


def test_policies():
    assert synthetic_counts([50, 10, 0], "fill_to", 30) == [0, 20, 30]
    assert synthetic_counts([50, 10], "addon", 7) == [7, 7]
    assert synthetic_counts([50, 10, 45], "fill_to_max", None) == [0, 40, 5]


def test_groups_paper_thresholds():
    g = GroupsConfig()
    assert [group_of(n, g) for n in (101, 100, 20, 19, 1)] == ["many", "medium", "medium", "few", "few"]
    g2 = GroupsConfig(many_above=10, few_below=3)
    assert [group_of(n, g2) for n in (11, 10, 3, 2)] == ["many", "medium", "medium", "few"]


def test_plan_counts_checkpoints_and_shards():
    counts = [25, 12, 4, 1]
    plan = make_plan(recipe(shards={"max_samples": 16, "num_shards_multiple_of": 1}), fake_index(counts))
    assert [c.synthetic for c in plan.classes] == [5, 18, 26, 29]
    assert plan.num_synthetic == 78 and plan.imbalance_factor == 25
    syn = [s for sh in plan.shards_of("train", "synthetic") for s in sh.samples]
    assert len(syn) == 78 and len({s.key for s in syn}) == 78
    for c in plan.classes:
        # steps = min(max(10 * n, 30), 100), a checkpoint every 10: used evenly, round-robin
        steps = min(max(10 * c.real, 30), 100)
        assert c.token_steps == tuple(range(10, steps + 1, 10))
        used = Counter(s.token_step for s in syn if s.class_index == c.index)
        assert set(used) <= set(c.token_steps)
        assert max(used.values()) - min(used.values()) <= 1
        if c.synthetic >= len(c.token_steps):
            assert set(used) == set(c.token_steps)
    # shards: at most max_samples, near-equal, classes mixed
    for sh in plan.shards:
        assert 0 < len(sh.samples) <= 16
    sizes = [len(sh.samples) for sh in plan.shards_of("train", "synthetic")]
    assert max(sizes) - min(sizes) <= 1 and len(sizes) == 5
    for sh in plan.shards_of("train", "synthetic"):
        assert len({s.class_index for s in sh.samples}) >= 2
    assert sum(len(sh.samples) for sh in plan.shards_of("train", "real")) == 42
    assert sum(len(sh.samples) for sh in plan.shards_of("test", "real")) == 8


def test_plan_is_deterministic_and_seeded():
    a = make_plan(recipe(), fake_index([25, 12, 4, 1]))
    b = make_plan(recipe(), fake_index([25, 12, 4, 1]))
    flat = lambda p: [(sh.name, [s.key for s in sh.samples]) for sh in p.shards]
    assert flat(a) == flat(b)
    c = make_plan(recipe(seed=1), fake_index([25, 12, 4, 1]))
    assert flat(a) != flat(c)
    seeds = [s.seed for sh in a.shards_of("train", "synthetic") for s in sh.samples]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(0, 3, 5) == sample_seed(0, 3, 5) != sample_seed(0, 3, 6)


def test_strategy_none_plans_no_synthetic_and_single_template_no_steps():
    plan = make_plan(recipe(generator={"strategy": "none"}), fake_index([5, 2]))
    assert plan.num_synthetic == 0 and not plan.shards_of("train", "synthetic")
    plan = make_plan(recipe(generator={"strategy": "single_template", "prompt": "a photo of a {class_name}"}),
                     fake_index([5, 2]))
    assert all(s.token_step == -1 for sh in plan.shards_of("train", "synthetic") for s in sh.samples)


def test_shard_count_multiple():
    plan = make_plan(recipe(shards={"max_samples": 16, "num_shards_multiple_of": 4}), fake_index([25, 12, 4, 1]))
    assert len(plan.shards_of("train", "synthetic")) == 8 and plan.shard_multiples["train-synthetic"] == 4


def test_auto_shard_counts_divide_among_ranks_without_slivers():
    """datasets' split_dataset_by_node shares shards across ranks only when the count divides; our loader deals
    whole shards best when ranks x workers do. auto: a multiple of 64 where shards stay at least half full,
    else of 8, else as many as max_samples needs."""
    from fillup_data.plan import shard_count

    assert shard_count(1_184_154, 10_000, "auto") == (128, 64)  # ImageNet-LT synthetic at fill 1,300: 119 -> 128
    assert shard_count(7_704_487, 10_000, "auto") == (832, 64)  # iNaturalist synthetic at fill 1,000
    assert shard_count(437_513, 10_000, "auto") == (64, 64)  # iNaturalist real: 44 -> 64 of 6,836
    assert shard_count(115_846, 10_000, "auto") == (16, 8)  # ImageNet-LT real: 64 would be 1,810 a shard
    assert shard_count(50_000, 10_000, "auto") == (8, 8)  # ImageNet-LT test
    assert shard_count(1_038, 500, "auto") == (3, 1)  # the demo: 8 shards of 130 would be slivers
    assert shard_count(100, 10, 7) == (14, 7)  # an explicit multiple is kept
    plan = make_plan(recipe(shards={"max_samples": 16}), fake_index([25, 12, 4, 1]))
    assert plan.shard_multiples == {"train-real": 1, "test-real": 1, "train-synthetic": 8}
    assert len(plan.shards_of("train", "synthetic")) == 8  # 78 samples: 8 shards of 9-10, at least half of 16


def test_a_plan_at_inaturalist_size_holds_no_object_per_sample():
    """iNaturalist filled to 1,000 is 7.7M synthetic samples; `plan`, `status` and every worker make the
    plan, so it keeps positions, not samples: 1,000 classes filled to 2,000 (2M samples) stay in tens of MB."""
    import tracemalloc

    index = fake_index([5] * 1000, test=0)
    tracemalloc.start()
    try:
        plan = make_plan(recipe(fill={"policy": "fill_to", "target": 2000}, shards={"max_samples": 10000}), index)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.num_synthetic == 1000 * 1995
    assert peak < 64 * 2**20, f"make_plan peaked at {peak / 2**20:.0f} MiB"
    # and the samples are still all there, made on demand: one shard's worth, with the plan's seeds
    shard = plan.shards_of("train", "synthetic")[-1]
    samples = list(shard.samples)
    assert len(samples) == shard.num_samples > 0 and samples[0] == shard.samples[0]
    assert all(s.seed == sample_seed(0, s.class_index, s.ordinal) for s in samples[:100])
