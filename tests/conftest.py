import pytest
import torch


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray with 2 CPUs and no GPU, one per test module (it takes 4-9 s to start).

    Yields its GCS address, for drivers in subprocesses to attach to.
    """
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared machine they only contend.

    Modules that train many tiny models take it with ``pytestmark``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
