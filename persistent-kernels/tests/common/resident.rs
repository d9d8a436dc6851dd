//! The resident-buffer contract (`src/resident.rs`), checked the same way on
//! every backend: each check returns a description of what went wrong.

use granary_kernels::shipped::{self, MATMUL, SAXPY, bytes_f32, f32_bytes};
use granary_kernels::{Backend, BackendError, BatchOutput, BatchPart, CpuBackend, Status};

use super::random_f32s;

type Check = Result<(), String>;

fn expect<T: std::fmt::Debug>(got: Result<T, BackendError>, what: &str) -> Result<T, String> {
    got.map_err(|err| format!("{what}: {err}"))
}

/// A new buffer is zeroed; writes and reads land where they say; ranges
/// outside the buffer are typed errors.
pub fn writes_and_reads_round_trip(backend: &dyn Backend) -> Check {
    let buffer = expect(backend.alloc_resident(0, 4096), "alloc")?;
    if buffer.len() != 4096 {
        return Err(format!("length {}", buffer.len()));
    }
    let zeros = expect(backend.read_resident(&*buffer, 0, 4096), "read")?;
    if zeros.iter().any(|&b| b != 0) {
        return Err("a new buffer is not zeroed".into());
    }
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    expect(backend.write_resident(&*buffer, 1000, &data), "write")?;
    let back = expect(backend.read_resident(&*buffer, 1000, 1000), "read back")?;
    if back != data {
        return Err("the bytes read back differ from those written".into());
    }
    let around = expect(backend.read_resident(&*buffer, 990, 20), "read around")?;
    if around[..10] != [0; 10] || around[10..] != data[..10] {
        return Err(format!("bytes around the write: {around:?}"));
    }
    for (offset, len) in [(4000, 97), (4097, 0), (usize::MAX, 2)] {
        match backend.read_resident(&*buffer, offset, len) {
            Err(BackendError::BadBuffer(_)) => {}
            other => return Err(format!("read of {len} at {offset}: {other:?}")),
        }
        match backend.write_resident(&*buffer, offset, &vec![1; len.min(100)]) {
            Err(BackendError::BadBuffer(_)) => {}
            other => return Err(format!("write of {len} at {offset}: {other:?}")),
        }
    }
    let empty = expect(backend.alloc_resident(0, 0), "an empty buffer")?;
    let nothing = expect(backend.read_resident(&*empty, 0, 0), "read of nothing")?;
    if !nothing.is_empty() {
        return Err("an empty read returned bytes".into());
    }
    Ok(())
}

/// Two threads write neighbouring bytes of one word at once, 200 times:
/// each keeps its byte (wgpu writes a part of a word by reading the word
/// and writing it back whole, which two writes at once could each do with
/// the other's byte as it was).
pub fn writes_to_neighbouring_bytes_at_once_keep_both(backend: &dyn Backend) -> Check {
    let buffer = expect(backend.alloc_resident(0, 4), "alloc")?;
    let start = std::sync::Barrier::new(2);
    for round in 1..=200u8 {
        let (first, second) = std::thread::scope(|scope| {
            let write = |offset: usize| {
                let (buffer, start) = (&buffer, &start);
                scope.spawn(move || {
                    start.wait();
                    backend.write_resident(&**buffer, offset, &[round])
                })
            };
            let (first, second) = (write(0), write(2));
            (first.join(), second.join())
        });
        for written in [first, second] {
            match written {
                Ok(result) => expect(result, "write")?,
                Err(_) => return Err("a writing thread panicked".into()),
            }
        }
        let word = expect(backend.read_resident(&*buffer, 0, 4), "read")?;
        if word != [round, 0, round, 0] {
            return Err(format!("round {round}: the word reads {word:?}"));
        }
    }
    Ok(())
}

/// `y = a·y + y` in place, three times, with only `a` crossing from the
/// host: the buffer is both request parts and the output.
pub fn saxpy_in_place_keeps_the_data_on_the_device(backend: &dyn Backend) -> Check {
    const N: usize = 10_000;
    let start = random_f32s(7, N);
    let buffer = expect(backend.alloc_resident(0, N * 4), "alloc")?;
    expect(
        backend.write_resident(&*buffer, 0, &f32_bytes(&start)),
        "write",
    )?;
    let mut expected = start.clone();
    for a in [0.5f32, -1.25, 3.0] {
        let scalar = f32_bytes(&[a]);
        let parts = [
            BatchPart::Host(&scalar),
            BatchPart::Resident(&*buffer),
            BatchPart::Resident(&*buffer),
        ];
        let returned = expect(
            backend.run_batch_parts(0, &SAXPY, &parts, BatchOutput::Into(&*buffer)),
            "saxpy into the buffer",
        )?;
        if !returned.is_empty() {
            return Err("a batch into a buffer returned bytes".into());
        }
        for y in &mut expected {
            *y = a * *y + *y;
        }
    }
    let got = bytes_f32(&expect(backend.read_resident(&*buffer, 0, N * 4), "read")?);
    if got != expected {
        let first = got.iter().zip(&expected).position(|(g, e)| g != e);
        return Err(format!("saxpy in place differs at element {first:?}"));
    }
    Ok(())
}

/// Matrices kept on the device, dimensions from the host, the product back
/// on the host: the same bytes as the CPU's batch over the whole request.
pub fn matmul_of_resident_matrices_matches_the_cpu(backend: &dyn Backend) -> Check {
    let (n, k, m) = (33usize, 17usize, 29usize);
    let a = random_f32s(11, n * k);
    let b = random_f32s(12, k * m);
    let a_buffer = expect(backend.alloc_resident(0, n * k * 4), "alloc a")?;
    let b_buffer = expect(backend.alloc_resident(0, k * m * 4), "alloc b")?;
    expect(
        backend.write_resident(&*a_buffer, 0, &f32_bytes(&a)),
        "write a",
    )?;
    expect(
        backend.write_resident(&*b_buffer, 0, &f32_bytes(&b)),
        "write b",
    )?;
    let dims = f32_bytes(&[n as f32, k as f32, m as f32]);
    let parts = [
        BatchPart::Host(&dims),
        BatchPart::Resident(&*a_buffer),
        BatchPart::Resident(&*b_buffer),
    ];
    let got = expect(
        backend.run_batch_parts(0, &MATMUL, &parts, BatchOutput::Host),
        "matmul",
    )?;
    let whole = shipped::matmul_request(n, k, m, &a, &b).ok_or("a matmul request")?;
    let cpu = expect(CpuBackend::new().run_batch(0, &MATMUL, &whole), "the CPU's")?;
    if got != cpu {
        return Err("the product differs from the CPU's".into());
    }
    Ok(())
}

/// Misuse is typed, and the backend keeps serving.
pub fn misuse_is_typed(backend: &dyn Backend) -> Check {
    let buffer = expect(backend.alloc_resident(0, 400), "alloc")?;
    let scalar = f32_bytes(&[2.0]);
    // An output buffer of the wrong length (saxpy over 100 answers 100
    // floats; this one holds 99).
    let short = expect(backend.alloc_resident(0, 396), "alloc short")?;
    let parts = [
        BatchPart::Host(&scalar),
        BatchPart::Resident(&*buffer),
        BatchPart::Resident(&*buffer),
    ];
    match backend.run_batch_parts(0, &SAXPY, &parts, BatchOutput::Into(&*short)) {
        Err(BackendError::BadBuffer(_)) => {}
        other => return Err(format!("a short output buffer: {other:?}")),
    }
    // A scalar the kernel rejects, checked before anything runs.
    let nan = f32_bytes(&[f32::NAN]);
    let bad = [
        BatchPart::Host(&nan),
        BatchPart::Resident(&*buffer),
        BatchPart::Resident(&*buffer),
    ];
    match backend.run_batch_parts(0, &SAXPY, &bad, BatchOutput::Into(&*buffer)) {
        Err(BackendError::Rejected(Status::BadInput)) => {}
        other => return Err(format!("a NaN scalar: {other:?}")),
    }
    // A request of the wrong shape (an even element count for saxpy).
    let even = [BatchPart::Resident(&*buffer), BatchPart::Resident(&*buffer)];
    match backend.run_batch_parts(0, &SAXPY, &even, BatchOutput::Host) {
        Err(BackendError::Rejected(_) | BackendError::WrongShape(_)) => {}
        other => return Err(format!("a request of the wrong shape: {other:?}")),
    }
    // Another backend's buffer, and an unknown device.
    let foreign: Box<dyn granary_kernels::DeviceBuffer> =
        if backend.kind() == granary_kernels::BackendKind::Cpu {
            Box::new(granary_kernels::resident::CpuBuffer::new(400))
        } else {
            expect(CpuBackend::new().alloc_resident(0, 400), "a CPU buffer")?
        };
    if backend.kind() != granary_kernels::BackendKind::Cpu {
        match backend.read_resident(&*foreign, 0, 4) {
            Err(BackendError::BadBuffer(_)) => {}
            other => return Err(format!("a foreign buffer: {other:?}")),
        }
        let with_foreign = [
            BatchPart::Host(&scalar),
            BatchPart::Resident(&*foreign),
            BatchPart::Resident(&*buffer),
        ];
        match backend.run_batch_parts(0, &SAXPY, &with_foreign, BatchOutput::Host) {
            Err(BackendError::BadBuffer(_)) => {}
            other => return Err(format!("a foreign part: {other:?}")),
        }
    }
    match backend.alloc_resident(99, 4) {
        Err(BackendError::UnknownDevice(99)) => {}
        other => return Err(format!("device 99: {other:?}")),
    }
    // Still serving.
    let parts = [
        BatchPart::Host(&scalar),
        BatchPart::Resident(&*buffer),
        BatchPart::Resident(&*buffer),
    ];
    expect(
        backend.run_batch_parts(0, &SAXPY, &parts, BatchOutput::Into(&*buffer)),
        "after the misuse",
    )?;
    Ok(())
}

/// One check of the contract.
pub type ContractCheck = fn(&dyn Backend) -> Check;

/// Every check, by name.
pub const ALL: [(&str, ContractCheck); 5] = [
    ("writes_and_reads_round_trip", writes_and_reads_round_trip),
    (
        "writes_to_neighbouring_bytes_at_once_keep_both",
        writes_to_neighbouring_bytes_at_once_keep_both,
    ),
    (
        "saxpy_in_place_keeps_the_data_on_the_device",
        saxpy_in_place_keeps_the_data_on_the_device,
    ),
    (
        "matmul_of_resident_matrices_matches_the_cpu",
        matmul_of_resident_matrices_matches_the_cpu,
    ),
    ("misuse_is_typed", misuse_is_typed),
];
