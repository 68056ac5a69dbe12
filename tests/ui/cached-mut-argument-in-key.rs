use racefree::cached;

#[cached]
fn load(buffer: &mut Vec<u8>, id: u64) -> u64 {
    buffer.push(1);
    id
}

fn main() {
    load(&mut Vec::new(), 1);
}
