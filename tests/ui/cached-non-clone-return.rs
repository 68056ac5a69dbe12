use racefree::cached;

struct Report {
    lines: Vec<String>,
}

#[cached]
fn report(id: u64) -> Report {
    Report { lines: vec![id.to_string()] }
}

fn main() {
    let _ = report(1).lines;
}
