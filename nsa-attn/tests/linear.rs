//! `nsa_attn::f_linear` against the constructor it replaces, tch's panicking `nn::linear`: the
//! same variables, bit for bit, on a fresh random seed (checkpoints and seeded runs depend on it).
use nsa_attn::f_linear;
use tch::{nn, Device, Kind, Tensor};

/// Every variable of a var store, sorted by name.
fn variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<_> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Same names, shapes, kinds and bits for every bias and init setting, and the same random
/// stream afterwards (so whatever a model creates next is unchanged too).
#[test]
fn f_linear_matches_nn_linear_bit_for_bit() {
    // Before any other libtorch call: see the crate docs' note on CUDA start-up.
    nsa_sys::cuda::load_backend().expect("loading libtorch's CUDA backend");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::from(d.subsec_nanos()));
    let configs = [
        nn::LinearConfig::default(),
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bias: false,
            ..Default::default()
        },
        nn::LinearConfig {
            bs_init: Some(nn::Init::Const(0.5)),
            ..Default::default()
        },
    ];
    for (i, c) in configs.into_iter().enumerate() {
        let build = |fallible: bool| {
            tch::manual_seed(seed);
            let vs = nn::VarStore::new(Device::Cpu);
            let path = vs.root() / "layer";
            let layer = if fallible {
                f_linear(&path, 7, 5, c).unwrap()
            } else {
                nn::linear(&path, 7, 5, c)
            };
            let next = Tensor::randn([3], (Kind::Float, Device::Cpu));
            (vs, layer, next)
        };
        let (vs_ref, layer_ref, next_ref) = build(false);
        let (vs_new, layer_new, next_new) = build(true);
        let (vars_ref, vars_new) = (variables(&vs_ref), variables(&vs_new));
        let names = |v: &[(String, Tensor)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&vars_ref),
            names(&vars_new),
            "config {i}, seed {seed}"
        );
        for ((name, a), (_, b)) in vars_ref.iter().zip(&vars_new) {
            assert_eq!(a.size(), b.size(), "{name}, config {i}, seed {seed}");
            assert_eq!(a.kind(), b.kind(), "{name}, config {i}, seed {seed}");
            assert!(a.equal(b), "{name} differs, config {i}, seed {seed}");
            assert!(b.requires_grad(), "{name} must be trainable");
        }
        assert!(layer_ref.ws.equal(&layer_new.ws), "config {i}, seed {seed}");
        assert_eq!(layer_ref.bs.is_some(), layer_new.bs.is_some());
        assert!(
            next_ref.equal(&next_new),
            "random stream differs after init, config {i}, seed {seed}"
        );
    }
}

/// A libtorch failure while creating the variables is an `Err`, not a panic.
#[test]
fn f_linear_reports_libtorch_errors() {
    nsa_sys::cuda::load_backend().expect("loading libtorch's CUDA backend");
    let vs = nn::VarStore::new(Device::Cpu);
    assert!(f_linear(&(vs.root() / "bad"), 4, -3, Default::default()).is_err());
}
