use super::*;
use crate::policy::parse_documents;

fn health(cluster: &str, locality: &str, endpoints: u32, healthy: u32) -> ClusterHealth {
    ClusterHealth {
        cluster: cluster.into(),
        locality: (!locality.is_empty()).then(|| locality.to_string()),
        endpoints,
        healthy,
        lease_expired_at_ms: None,
        gateway_down: None,
    }
}

fn names(t: &Table) -> Vec<Vec<&str>> {
    t.tiers
        .iter()
        .map(|t| t.clusters.iter().map(|c| c.cluster.as_str()).collect())
        .collect()
}

fn policy(yaml: &str) -> Vec<Policy> {
    parse_documents("test.yaml", yaml).unwrap()
}

const NOW_MS: u64 = 1_000_000;

#[test]
fn by_default_local_first_then_zone_region_and_the_rest() {
    let clusters = [
        health("far", "eu-west/a", 3, 3),
        health("east", "us-east/a", 3, 3),
        health("east-b", "us-east/b", 2, 2),
        health("east-a2", "us-east/a", 1, 1),
    ];
    let t = plan(
        "reviews.default",
        &Settings::default(),
        "east",
        Some("us-east/a"),
        &clusters,
        NOW_MS,
    );
    assert_eq!(
        names(&t),
        vec![vec!["east"], vec!["east-a2"], vec!["east-b"], vec!["far"]]
    );
    let mut h = Hysteresis::default();
    let mut t = t;
    h.decide(&mut t, DEFAULT_HYSTERESIS, Instant::now());
    assert_eq!(t.active_clusters(), vec!["east"]);
}

#[test]
fn failing_over_is_immediate_and_coming_home_waits_for_the_hysteresis() {
    let settings = Settings::default();
    let t0 = Instant::now();
    let mut h = Hysteresis::default();
    let run = |h: &mut Hysteresis, local_healthy: u32, at: Duration| {
        let clusters = [
            health("east", "", 3, local_healthy),
            health("west", "", 2, 2),
        ];
        let mut t = plan("r.d", &settings, "east", None, &clusters, NOW_MS);
        h.decide(&mut t, Duration::from_secs(5), t0 + at);
        t
    };
    assert_eq!(
        run(&mut h, 3, Duration::ZERO).active_clusters(),
        vec!["east"]
    );
    // All local endpoints die: west at once.
    assert_eq!(
        run(&mut h, 0, Duration::from_secs(1)).active_clusters(),
        vec!["west"]
    );
    // They return: still west until they have been healthy for 5s.
    let t = run(&mut h, 3, Duration::from_secs(2));
    assert_eq!(t.active_clusters(), vec!["west"]);
    assert!(
        t.tiers[0].state.starts_with("returning in 5.0s"),
        "{}",
        t.tiers[0].state
    );
    assert_eq!(
        run(&mut h, 3, Duration::from_millis(6_900)).active_clusters(),
        vec!["west"]
    );
    // A flap restarts the clock.
    assert_eq!(
        run(&mut h, 0, Duration::from_secs(7)).active_clusters(),
        vec!["west"]
    );
    assert_eq!(
        run(&mut h, 3, Duration::from_secs(8)).active_clusters(),
        vec!["west"]
    );
    assert_eq!(
        run(&mut h, 3, Duration::from_millis(12_999)).active_clusters(),
        vec!["west"]
    );
    let home = run(&mut h, 3, Duration::from_secs(13));
    assert_eq!(home.active_clusters(), vec!["east"]);
    assert_eq!(home.tiers[0].state, "active");
    assert_eq!(home.tiers[1].state, "standby");
}

#[test]
fn below_min_healthy_percent_traffic_spills_to_the_next_priority() {
    let docs = policy(
        "apiVersion: isthmus.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: reviews, namespace: default}\n\
         spec:\n  service: reviews\n  priorities: [{clusters: [central]}, {clusters: [west]}]\n  minHealthyPercent: 50\n  hysteresis: 2s\n",
    );
    let s = Settings::resolve(&docs, "default", "reviews", None);
    assert_eq!(s.source, "FailoverPolicy default/reviews");
    assert_eq!(s.hysteresis, Duration::from_secs(2));
    let clusters = [
        health("east", "", 4, 1),
        health("west", "", 2, 2),
        health("central", "", 2, 2),
        health("unlisted", "", 9, 9),
    ];
    let mut t = plan("reviews.default", &s, "east", None, &clusters, NOW_MS);
    assert_eq!(names(&t), vec![vec!["east"], vec!["central"], vec!["west"]]);
    assert_eq!(t.excluded[0].cluster, "unlisted");
    Hysteresis::default().decide(&mut t, s.hysteresis, Instant::now());
    assert_eq!(t.active_clusters(), vec!["central"]);
    assert!(
        t.tiers[0].state.contains("25% healthy, below 50%"),
        "{}",
        t.tiers[0].state
    );
    // Another service of the namespace keeps the default.
    assert_eq!(
        Settings::resolve(&docs, "default", "ratings", None).source,
        Settings::default().source
    );
}

#[test]
fn a_down_gateway_takes_its_cluster_out_at_once() {
    let mut west = health("west", "", 2, 2);
    west.gateway_down = Some("Unreachable: connection lost".into());
    let clusters = [health("east", "", 1, 0), west, health("central", "", 1, 1)];
    let mut t = plan("r.d", &Settings::default(), "east", None, &clusters, NOW_MS);
    Hysteresis::default().decide(&mut t, DEFAULT_HYSTERESIS, Instant::now());
    assert_eq!(t.active_clusters(), vec!["central"]);
    let west_row = &t
        .tiers
        .iter()
        .flat_map(|t| &t.clusters)
        .find(|c| c.cluster == "west")
        .unwrap();
    assert_eq!(west_row.healthy, 0);
    assert!(west_row.gateway.starts_with("down: Unreachable"));
}

#[test]
fn a_lapsed_lease_means_what_on_partition_says() {
    let lapsed = |ms_ago: u64| {
        let mut h = health("west", "", 2, 2);
        h.lease_expired_at_ms = Some(NOW_MS - ms_ago);
        h
    };
    let settings = |mode: &str| {
        let docs = policy(&format!(
            "apiVersion: isthmus.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {{name: all, namespace: default}}\n\
             spec:\n  priorities: [{{clusters: [west]}}, {{clusters: [central]}}]\n  onPartition: {mode}\n"
        ));
        Settings::resolve(&docs, "default", "reviews", None)
    };
    let decide = |s: &Settings, west: ClusterHealth| {
        let clusters = [health("east", "", 1, 0), west, health("central", "", 1, 1)];
        let mut t = plan("reviews.default", s, "east", None, &clusters, NOW_MS);
        Hysteresis::default().decide(&mut t, s.hysteresis, Instant::now());
        t
    };
    let keep = settings("keepLastKnown");
    assert!(keep.source.ends_with("(namespace-wide)"));
    assert_eq!(
        decide(&keep, lapsed(60_000)).active_clusters(),
        vec!["west"]
    );

    let drain = settings("drainToNext");
    let t = decide(&drain, lapsed(1));
    assert_eq!(t.active_clusters(), vec!["central"]);
    assert_eq!(names(&t), vec![vec!["east"], vec!["central"], vec!["west"]]);
    // Drained, but still the last resort.
    let clusters = [health("east", "", 1, 0), lapsed(1)];
    let mut t = plan("reviews.default", &drain, "east", None, &clusters, NOW_MS);
    Hysteresis::default().decide(&mut t, drain.hysteresis, Instant::now());
    assert_eq!(t.active_clusters(), vec!["west"]);

    let withdraw = settings("{withdrawAfter: 10s}");
    let t = decide(&withdraw, lapsed(4_000));
    assert_eq!(t.active_clusters(), vec!["west"]);
    assert!(t.tiers[1].clusters[0].reason.contains("withdrawn in 6.0s"));
    let t = decide(&withdraw, lapsed(10_000));
    assert_eq!(t.active_clusters(), vec!["central"]);
    assert!(t.excluded[0].reason.contains("withdrawn"));
}

#[test]
fn nothing_eligible_means_panic_mode_on_the_nearest_priority_with_endpoints() {
    let clusters = [health("east", "", 2, 0), health("west", "", 1, 0)];
    let mut t = plan("r.d", &Settings::default(), "east", None, &clusters, NOW_MS);
    let mut h = Hysteresis::default();
    h.decide(&mut t, DEFAULT_HYSTERESIS, Instant::now());
    assert_eq!(t.active, Some(0));
    assert!(t.tiers[0].state.contains("panic"));
}

#[test]
fn istio_locality_lb_setting_maps_onto_the_same_priorities() {
    let docs = policy(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\n\
         spec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        enabled: true\n\
         \x20       failover: [{from: us-east, to: eu-west}]\n        failoverPriority: [topology.kubernetes.io/region]\n",
    );
    let s = Settings::resolve(&docs, "default", "reviews", Some("us-east/a"));
    assert!(s.source.contains("localityLbSetting"), "{}", s.source);
    assert_eq!(
        s.ignored,
        vec!["localityLbSetting.failoverPriority is not applied"]
    );
    let clusters = [
        health("east", "us-east/a", 1, 0),
        health("asia", "ap-south/a", 5, 5),
        health("paris", "eu-west/a", 1, 1),
        health("east-b", "us-east/b", 1, 0),
    ];
    let mut t = plan(
        "reviews.default",
        &s,
        "east",
        Some("us-east/a"),
        &clusters,
        NOW_MS,
    );
    assert_eq!(
        names(&t),
        vec![vec!["east"], vec!["east-b"], vec!["paris"], vec!["asia"]]
    );
    Hysteresis::default().decide(&mut t, s.hysteresis, Instant::now());
    assert_eq!(t.active_clusters(), vec!["paris"]);
    let text = render(&t, "east");
    assert!(text.contains("* priority 2"), "{text}");
}

#[test]
fn bad_failover_policies_are_refused_by_field() {
    let cases = [
        (
            "priorities: [{clusters: [a], regions: [b]}]",
            "spec.priorities[0]",
        ),
        (
            "priorities: [{byLocality: true}, {clusters: [a]}]",
            "spec.priorities[0].byLocality",
        ),
        ("minHealthyPercent: 150", "spec.minHealthyPercent"),
        ("hysteresis: soon", "spec.hysteresis"),
        ("onPartition: forget", "spec.onPartition"),
        ("onPartition: {withdrawAfter: never}", "spec.onPartition"),
        (
            "priorities: [{clusters: [Bad_Name]}]",
            "spec.priorities[0].clusters[0]",
        ),
    ];
    for (spec, field) in cases {
        let yaml = format!(
            "apiVersion: isthmus.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {{name: x, namespace: default}}\nspec:\n  {spec}\n"
        );
        let err = parse_documents("f.yaml", &yaml).unwrap_err().to_string();
        assert!(err.contains(field), "{spec}: {err}");
    }
}

#[test]
fn retries_that_may_leave_the_active_priority_take_each_later_healthy_one_in_turn() {
    let clusters = [
        health("east", "us-east/a", 2, 2),
        health("east-b", "us-east/b", 2, 0),
        health("central", "us-east/c", 1, 1),
        health("far", "eu-west/a", 3, 3),
    ];
    let mut t = plan(
        "reviews.default",
        &Settings::default(),
        "east",
        Some("us-east/a"),
        &clusters,
        NOW_MS,
    );
    Hysteresis::default().decide(&mut t, DEFAULT_HYSTERESIS, Instant::now());
    assert_eq!(t.active_clusters(), vec!["east"]);
    // east-b has no healthy endpoint: skipped.
    let turns: Vec<Vec<&str>> = (0..5).map(|n| t.retry_clusters(n)).collect();
    assert_eq!(
        turns,
        vec![
            vec!["east"],
            vec!["central"],
            vec!["far"],
            vec!["east"],
            vec!["central"]
        ]
    );
}

fn distribute(to: &str) -> Vec<Policy> {
    policy(&format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: default}}\n\
         spec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n\
         \x20       distribute: [{{from: 'eu-west/*', to: {{'eu-west/*': 100}}}}, {{from: 'us-east/a/*', to: {to}}}]\n",
    ))
}

#[test]
fn distribute_splits_a_callers_traffic_across_localities_by_weight() {
    let docs = distribute("{'us-east/a/*': 80, 'us-west': 20}");
    let s = Settings::resolve(&docs, "default", "reviews", Some("us-east/a"));
    assert_eq!(
        s.distribute,
        vec![("us-east/a/*".to_string(), 80), ("us-west".to_string(), 20)]
    );
    let clusters = [
        health("east", "us-east/a", 2, 2),
        health("east-b", "us-east/b", 1, 1),
        health("west", "us-west/a", 1, 1),
        health("west-2", "us-west/b", 1, 0),
    ];
    let mut t = plan(
        "reviews.default",
        &s,
        "east",
        Some("us-east/a"),
        &clusters,
        NOW_MS,
    );
    Hysteresis::default().decide(&mut t, s.hysteresis, Instant::now());
    // Rolls below 0.8 go to us-east/a, the rest to us-west (its healthy cluster only);
    // east-b is in no share.
    assert_eq!(t.distributed_clusters(0.0), Some(vec!["east"]));
    assert_eq!(t.distributed_clusters(0.79), Some(vec!["east"]));
    assert_eq!(t.distributed_clusters(0.8), Some(vec!["west"]));
    assert_eq!(t.distributed_clusters(0.999), Some(vec!["west"]));
    assert!(render(&t, "east").contains("distribute: us-east/a/* 80%, us-west 20%"));

    // A share with no healthy cluster gives its weight to the others; none at all: the
    // priorities decide.
    let down = [
        health("east", "us-east/a", 2, 0),
        health("west", "us-west/a", 1, 1),
    ];
    let t = plan(
        "reviews.default",
        &s,
        "east",
        Some("us-east/a"),
        &down,
        NOW_MS,
    );
    assert_eq!(t.distributed_clusters(0.1), Some(vec!["west"]));
    let none = [
        health("east", "us-east/a", 2, 0),
        health("east-b", "us-east/b", 1, 1),
    ];
    let t = plan(
        "reviews.default",
        &s,
        "east",
        Some("us-east/a"),
        &none,
        NOW_MS,
    );
    assert_eq!(t.distributed_clusters(0.1), None);
    // A caller no rule's `from` matches follows the priorities.
    let other = Settings::resolve(&docs, "default", "reviews", Some("ap-south/a"));
    assert!(other.distribute.is_empty());
}

#[test]
fn locality_patterns_match_segment_by_segment() {
    assert!(locality_matches("us-east/a/*", "us-east/a"));
    assert!(locality_matches("us-east/*", "us-east/b"));
    assert!(locality_matches("us-east", "us-east/b"));
    assert!(locality_matches("*", "anything/at/all"));
    assert!(!locality_matches("us-east/a/*", "us-east/b"));
    assert!(!locality_matches("us-east/a/z1", "us-east/a"));
    assert!(!locality_matches("us-west/*", "us-east/a"));
}

#[test]
fn distribute_weights_are_checked_as_istio_does() {
    let refused = |to: &str| {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r, namespace: default}}\n\
             spec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n\
             \x20       distribute: [{{from: 'us-east/*', to: {to}}}]\n"
        );
        parse_documents("dr.yaml", &yaml).unwrap_err().to_string()
    };
    let err = refused("{'us-east/*': 60, 'us-west/*': 30}");
    assert!(
        err.contains("localityLbSetting.distribute[0].to") && err.contains("add up to 90"),
        "{err}"
    );
    let err = refused("{'us-east/*': 'lots'}");
    assert!(err.contains("distribute[0].to.us-east/*"), "{err}");
}
