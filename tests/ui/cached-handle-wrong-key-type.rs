use racefree::cached;

#[cached]
fn shout(word: &str) -> String {
    word.to_uppercase()
}

fn main() {
    shout("a");
    // The cache's keys are `String`: `"a"` and `&"a"` are fine, a number is not.
    shout_cache().invalidate("a");
    shout_cache().invalidate(&"a");
    shout_cache().invalidate(&1_u8);
}
