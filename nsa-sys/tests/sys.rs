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

/// Gradient-ready hooks: called once per backward for each parameter that got a gradient, after
/// that gradient (summed over the parameter's uses) is in `.grad`; never for an unused one; gone
/// after drop. On the CPU and, when present, on a GPU (where an autograd worker thread calls).
#[test]
fn grad_ready_hooks_fire_once_per_backward_with_the_final_gradient() {
    use nsa_sys::autograd::GradReadyHooks;
    use std::sync::{Arc, Mutex};
    use tch::{Device, Kind, Tensor};

    let backend = cuda::load_backend().unwrap();
    let mut devices = vec![Device::Cpu];
    if backend.has_gpu() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        let opts = (Kind::Float, device);
        let tied = Tensor::ones([3], opts).set_requires_grad(true);
        let once = Tensor::ones([2], opts).set_requires_grad(true);
        let unused = Tensor::ones([4], opts).set_requires_grad(true);
        let params = [
            tied.shallow_clone(),
            once.shallow_clone(),
            unused.shallow_clone(),
        ];
        // What each call saw: (parameter, the sum of its .grad at that moment).
        let seen: Arc<Mutex<Vec<(usize, f64)>>> = Arc::default();
        // Tensors are Send but not Sync; hooks may run on several threads at once.
        let watched: Mutex<Vec<Tensor>> =
            Mutex::new(params.iter().map(|t| t.shallow_clone()).collect());
        let log = seen.clone();
        let hooks = GradReadyHooks::new(&params, move |i| {
            let g = watched.lock().unwrap()[i].grad();
            let total = if g.defined() {
                g.sum(Kind::Double).double_value(&[])
            } else {
                f64::NAN
            };
            log.lock().unwrap().push((i, total));
        })
        .unwrap();
        let run = || {
            // `tied` is used twice: d/dtied = 2 + 3 per element.
            let loss = (&tied * 2.0).sum(Kind::Float)
                + (&tied * 3.0).sum(Kind::Float)
                + (&once * 7.0).sum(Kind::Float);
            loss.backward();
        };
        run();
        let mut first = seen.lock().unwrap().clone();
        first.sort_by_key(|e| e.0);
        assert_eq!(first, vec![(0, 15.0), (1, 14.0)], "{device:?}");
        // A second backward accumulates; the hook sees the accumulated gradient.
        run();
        let mut second = seen.lock().unwrap()[2..].to_vec();
        second.sort_by_key(|e| e.0);
        assert_eq!(second, vec![(0, 30.0), (1, 28.0)], "{device:?}");
        drop(hooks);
        run();
        assert_eq!(
            seen.lock().unwrap().len(),
            4,
            "{device:?}: no calls after drop"
        );
        // Only leaves that require grad can be watched; nothing stays registered on error.
        let not_leaf = &tied * 2.0;
        let err = GradReadyHooks::new(&[not_leaf], |_| {}).unwrap_err();
        assert!(err.to_string().contains("not a leaf"), "{err}");
    }
}

/// The sync debug guard finds c10's mode in libc10_cuda.so (CPU machines load it too), sets it
/// and restores the previous one, nested included; with a GPU, a host synchronisation under
/// `Error` is a tch error and the same call succeeds once the guard is gone.
#[test]
fn sync_debug_guard_sets_and_restores_libtorchs_mode() {
    use cuda::{SyncDebugGuard, SyncDebugMode};
    let backend = cuda::load_backend().unwrap();
    if matches!(backend, CudaBackend::NotBuilt { .. }) {
        assert!(SyncDebugGuard::new(SyncDebugMode::Error).is_err());
        return;
    }
    assert_eq!(cuda::sync_debug_mode().unwrap(), SyncDebugMode::Disabled);
    {
        let _outer = SyncDebugGuard::new(SyncDebugMode::Warn).unwrap();
        assert_eq!(cuda::sync_debug_mode().unwrap(), SyncDebugMode::Warn);
        {
            let _inner = SyncDebugGuard::new(SyncDebugMode::Error).unwrap();
            assert_eq!(cuda::sync_debug_mode().unwrap(), SyncDebugMode::Error);
        }
        assert_eq!(cuda::sync_debug_mode().unwrap(), SyncDebugMode::Warn);
    }
    assert_eq!(cuda::sync_debug_mode().unwrap(), SyncDebugMode::Disabled);
    if backend.has_gpu() {
        let x = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cuda(0)));
        let under_guard = {
            let _g = SyncDebugGuard::new(SyncDebugMode::Error).unwrap();
            x.sum(tch::Kind::Float).f_double_value(&[])
        };
        let err = under_guard.expect_err("item() synchronises");
        assert!(err.to_string().contains("synchroniz"), "{err}");
        assert_eq!(x.sum(tch::Kind::Float).double_value(&[]), 4.0);
    }
}
