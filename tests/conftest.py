"""Shared fixtures: a real local Ray (2 CPUs) and the path of the JPEG copy of CIFAR-10, if present."""
import os

import pytest

JPEG_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10-jpeg")

needs_jpeg_cifar10 = pytest.mark.skipif(not os.path.isdir(JPEG_CIFAR10),
                                        reason="the JPEG copy of CIFAR-10 is not on this machine")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from raysslvit.launch import start_ray

    start_ray(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
