//! nsa-sys as a user sees it: load the CUDA backend first, then everything else works on
//! whatever this machine has (CPU-only CI included).
use nsa_sys::cuda::{self, CudaBackend};
use nsa_sys::RuntimeFacts;

#[test]
fn backend_loads_and_facts_agree_with_it() {
    let backend = cuda::load_backend().expect("libtorch_cuda.so loads (or is reported absent)");
    // A second call returns the same answer without reloading.
    assert_eq!(cuda::load_backend().unwrap(), backend);
    let facts = RuntimeFacts::collect();
    assert_eq!(facts.cuda_available, backend.has_gpu());
    assert_eq!(
        facts.cuda_available,
        tch::Cuda::is_available(),
        "tch must see what we loaded"
    );
    match &backend {
        CudaBackend::Loaded { devices, .. } => {
            assert_eq!(*devices, tch::Cuda::device_count() as usize);
            assert!(facts.cuda_runtime.is_some() && facts.cudnn.is_some());
            assert!(nsa_sys::train::cuda_memory(0).is_some());
        }
        CudaBackend::NoDevice { .. } | CudaBackend::NotBuilt { .. } => {
            assert!(facts.cuda_runtime.is_none());
            assert!(
                nsa_sys::train::cuda_memory(0).is_none(),
                "no CUDA allocator without a GPU"
            );
        }
    }
    let json = serde_json::to_value(&facts).unwrap();
    for key in ["libtorch_version", "cuda_backend", "gpus", "nccl", "sdpa"] {
        assert!(json.get(key).is_some(), "snapshot lacks {key}");
    }
    assert!(cuda::libtorch_root()
        .unwrap()
        .join("lib/libtorch_cpu.so")
        .exists());
}
