//! `key = <expr>`: a borrowed key is stored in its owned form, an owned key as it is.

use racefree::{sequenced, Seq};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AggregateId(u32);

#[sequenced(key = aggregate_id)]
fn by_str(aggregate_id: &str, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = id)]
fn by_ref(id: &AggregateId, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = id)]
fn by_value(id: AggregateId, seq: Seq) -> u64 {
    seq.get()
}

#[sequenced(key = (region, shop.to_owned()))]
fn by_tuple(region: u8, shop: &str, seq: Seq) -> u64 {
    seq.get()
}

#[test]
fn borrowed_keys_are_owned_and_owned_keys_kept() {
    assert_eq!(
        (by_str("cart-1"), by_str("cart-1"), by_str("cart-2")),
        (1, 2, 1)
    );
    assert_eq!(
        by_str_sequence().next(&"cart-1".to_owned()),
        Some(3),
        "a &str key is kept as String"
    );
    let id = AggregateId(7);
    assert_eq!((by_ref(&id), by_ref(&id)), (1, 2));
    assert_eq!(
        by_ref_sequence().next(&id),
        Some(3),
        "a &AggregateId key is kept as AggregateId"
    );
    assert_eq!((by_value(id.clone()), by_value(id.clone())), (1, 2));
    assert_eq!(by_value_sequence().next(&id), Some(3));
    assert_eq!(
        (by_tuple(1, "a"), by_tuple(1, "a"), by_tuple(2, "a")),
        (1, 2, 1)
    );
    assert_eq!(by_tuple_sequence().next(&(1_u8, "a".to_owned())), Some(3));
}
