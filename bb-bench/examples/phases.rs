//! One balance refresh of a layer, for profiling (`valgrind --tool=callgrind`).
//! Usage: phases OUT IN ACTUATOR(sp_in|sp_out) REGROW(true|false) REPS
use bb_bench::*;
use bb_core::EdgeShape;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (out, inp): (usize, usize) = (a[1].parse().unwrap(), a[2].parse().unwrap());
    let shape = EdgeShape::dense(out, inp);
    let mut w = random_vec(7, shape.weight_len());
    let mut p = refresh_pruner(&shape, &a[3], a[4] == "true", true);
    for _ in 0..a[5].parse::<usize>().unwrap() {
        p.refresh(&mut [&mut w[..]], None).unwrap();
    }
    println!("density {}", p.density());
}
