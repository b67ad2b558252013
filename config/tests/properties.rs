//! Property tests: no input panics the parser, and whatever parses is valid.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use scalecar_config::{Policy, Role, ScalecarConfig};

const KEYS: [&str; scalecar_config::POLICY_KEYS.len()] = scalecar_config::POLICY_KEYS;

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{1,6}",
        "-?[0-9]{1,4}\\.[0-9]{1,3}",
        "[0-9]{1,3}(ms|s|m|h)",
        "[0-9]{1,2}-[0-9]{1,3}",
        "[*0-9/,-]{1,6} [*0-9/,-]{1,6} \\* \\* [0-7*] for [0-9]{1,2}h min [0-9]",
    ]
}

proptest! {
    #[test]
    fn any_annotation_values_never_panic(pairs in prop::collection::vec((0..KEYS.len(), value()), 0..8)) {
        let mut a: BTreeMap<String, String> = pairs
            .into_iter()
            .map(|(k, v)| (format!("scalecar.io/{}", KEYS[k]), v))
            .collect();
        a.entry("scalecar.io/model".into()).or_insert_with(|| "m".into());
        if let Ok(t) = Policy::from_annotations(&a) {
            let p = t.policy;
            prop_assert!(p.min_replicas <= p.max_bound());
            prop_assert!(p.activation_scale <= p.max_bound());
            prop_assert!(p.target > 0.0 && p.target.is_finite());
            prop_assert!(p.target_utilization > 0.0 && p.target_utilization <= 1.0);
            prop_assert!(p.max_scale_up_rate > 1.0 && p.max_scale_down_rate > 1.0);
            prop_assert!((110.0..=1000.0).contains(&p.panic_threshold_percentage));
            prop_assert!(!p.panic_window().is_zero());
            prop_assert!(p.panic_window() <= p.window);
        }
    }

    /// Knative accepts every stable window in [6 s, 1 h] with every panic
    /// percentage in [1, 100]; so must a Deployment annotated for it.
    #[test]
    fn every_knative_window_combination_is_accepted(secs in 6u64..=3600, pct in 1u32..=100) {
        let mut a = BTreeMap::new();
        a.insert("scalecar.io/model".to_string(), "m".to_string());
        a.insert("scalecar.io/window".to_string(), format!("{secs}s"));
        a.insert("scalecar.io/panic-window-percentage".to_string(), pct.to_string());
        let t = Policy::from_annotations(&a);
        prop_assert!(t.is_ok(), "window {secs}s at {pct} %: {:?}", t.err());
    }

    #[test]
    fn any_bare_keys_never_panic(pairs in prop::collection::vec((any::<String>(), value()), 0..6)) {
        let keys: BTreeMap<String, String> = pairs.into_iter().collect();
        let _ = Policy::from_keys(&keys, Role::Decode);
    }

    #[test]
    fn any_config_text_never_panics(text in any::<String>()) {
        let _ = ScalecarConfig::from_yaml_str(&text);
    }
}
