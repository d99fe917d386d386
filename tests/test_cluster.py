"""cluster.yaml is checked the way `ray up` checks it, without a cloud account."""
import os

import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        cfg = yaml.safe_load(f)
    validate_config(prepare_config(cfg))
    workers = cfg["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] == 1 and workers["min_workers"] <= workers["max_workers"]
    assert cfg["file_mounts"]["~/raysslvit"] == "." and any("pip install -e ~/raysslvit" in c for c in cfg["setup_commands"])
