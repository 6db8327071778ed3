//! QR codes of SMART Health Links, for paper or screen.
//!
//! # Why
//!
//! A SMART Health Link (`shlink:/…`, optionally behind a viewer URL ending in `#`) carries the
//! manifest URL *and the decryption key* of the shared files. Sent as an e-mail attachment or
//! pasted into a message it lingers in mail servers, backups, forwards and search indexes. Shown
//! on a screen or printed on paper, it goes from the patient to the person in front of them and
//! nowhere else: this is the in-person channel the HL7 *SMART Health Cards and Links* IG (Health
//! Links Specification, "Sharing User transmits a SMART Health Link") describes, which asks for
//! **error-correction level M**. We encode at level M (qrcodegen may boost the level when that
//! costs no extra modules) and let qrcodegen pick the segment mode for the whole text (byte mode
//! for any real link), at the smallest version that fits; a ~400-character link needs version 15.
//!
//! The link text itself never appears in the output besides the modules (no SVG `<title>`, no PNG
//! text chunk), and errors report only its length, so neither logs nor markup leak the key.
//!
//! # Formats
//!
//! Both formats draw dark modules in pure black on white, with the 4-module quiet zone the QR
//! standard requires around the symbol.
//!
//! * [`svg`]: for print and for screens of any density. The `viewBox` counts modules, so the
//!   image scales exactly; `width`/`height` give a pixel size hint of [`DEFAULT_SCALE`] pixels per
//!   module. One white `<rect>` for the background and one `<path>` whose sub-paths are the
//!   horizontal runs of dark modules (`M{x},{y}h{n}v1h-{n}z`); `shape-rendering="crispEdges"`
//!   keeps renderers from anti-aliasing seams between runs. Colours are presentation attributes,
//!   not `style`, and there are no scripts, links, fonts or external references, so it can be
//!   served (or inlined) under a CSP as strict as `default-src 'none'`.
//! * [`png`] / [`png_scaled`]: for places that want a bitmap. 1-bit grayscale (the smallest exact
//!   black-and-white encoding), no interlace, an integer number of pixels per module so module
//!   edges fall on pixel edges, and only the critical chunks `IHDR`, `IDAT` (zlib via `flate2`)
//!   and `IEND`: no timestamps or text, so the same link always gives the same bytes.

use std::fmt::Write as _;
use std::io::Write as _;

use flate2::Compression;
use flate2::Crc;
use flate2::write::ZlibEncoder;
use qrcodegen::{QrCode, QrCodeEcc};

/// Error-correction level of every code (HL7 SMART Health Links: "Error Correction Level M").
const ECC: QrCodeEcc = QrCodeEcc::Medium;

/// Width of the light border around the symbol, in modules (the QR standard's minimum).
pub const QUIET_ZONE: u32 = 4;

/// Pixels per module of [`png`] and of the size hint of [`svg`].
pub const DEFAULT_SCALE: u32 = 8;

/// Largest `scale` [`png_scaled`] accepts (a version-40 code is then 5 920 pixels wide).
pub const MAX_SCALE: u32 = 32;

/// Why a QR code could not be made (text too long).
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    /// The text does not fit a version-40 code at level M (about 2 331 bytes in byte mode).
    #[error("text of {bytes} bytes does not fit a QR code at error-correction level M")]
    TooLong {
        /// Length of the text in UTF-8 bytes (the text itself is a secret and is not kept).
        bytes: usize,
    },
    /// The requested PNG scale is 0 or above [`MAX_SCALE`].
    #[error("PNG scale {scale} is not between 1 and {MAX_SCALE} pixels per module")]
    Scale {
        /// The rejected pixels per module.
        scale: u32,
    },
    /// Writing the PNG failed (not expected: it is written to memory and bounded in size).
    #[error("PNG encoding failed")]
    Png(#[source] std::io::Error),
}

/// Encodes `text` at level M (boost allowed), smallest version, segments chosen by qrcodegen.
fn encode(text: &str) -> Result<QrCode, QrError> {
    QrCode::encode_text(text, ECC).map_err(|_| QrError::TooLong { bytes: text.len() })
}

/// Side of the image in modules, quiet zone included.
fn side(qr: &QrCode) -> u32 {
    qr.size().unsigned_abs() + 2 * QUIET_ZONE
}

/// Whether the module at image coordinates (quiet zone included) is dark.
fn dark(qr: &QrCode, x: u32, y: u32) -> bool {
    // Coordinates are below 200, so they fit i32; `get_module` is light outside the symbol.
    let (x, y) = (x.cast_signed(), y.cast_signed());
    let q = QUIET_ZONE.cast_signed();
    qr.get_module(x - q, y - q)
}

/// An SVG document (with XML declaration) of the code: one `<path>` of the dark modules, a
/// 4-module quiet zone, white background, `viewBox` in modules, `shape-rendering="crispEdges"`
/// and a size hint of [`DEFAULT_SCALE`] pixels per module; no scripts, styles or external
/// references.
pub fn svg(text: &str) -> Result<String, QrError> {
    let qr = encode(text)?;
    let n = side(&qr);
    let px = n * DEFAULT_SCALE;
    let mut d = String::new();
    for y in 0..n {
        let mut x = 0;
        while x < n {
            if !dark(&qr, x, y) {
                x += 1;
                continue;
            }
            let start = x;
            while x < n && dark(&qr, x, y) {
                x += 1;
            }
            let run = x - start;
            // Writing to a String cannot fail.
            let _ = write!(d, "M{start},{y}h{run}v1h-{run}z");
        }
    }
    Ok(format!(
        concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" ",
            "viewBox=\"0 0 {n} {n}\" width=\"{px}\" height=\"{px}\" ",
            "shape-rendering=\"crispEdges\" role=\"img\" aria-label=\"QR code\">",
            "<rect x=\"0\" y=\"0\" width=\"{n}\" height=\"{n}\" fill=\"#ffffff\"/>",
            "<path fill=\"#000000\" d=\"{d}\"/>",
            "</svg>\n"
        ),
        n = n,
        px = px,
        d = d,
    ))
}

/// A PNG of the code at [`DEFAULT_SCALE`] pixels per module (see [`png_scaled`]).
pub fn png(text: &str) -> Result<Vec<u8>, QrError> {
    png_scaled(text, DEFAULT_SCALE)
}

/// A 1-bit grayscale, non-interlaced PNG of the code, `scale` pixels per module (1 to
/// [`MAX_SCALE`]), 4-module quiet zone; chunks `IHDR`, `IDAT` (zlib) and `IEND` only.
pub fn png_scaled(text: &str, scale: u32) -> Result<Vec<u8>, QrError> {
    if !(1..=MAX_SCALE).contains(&scale) {
        return Err(QrError::Scale { scale });
    }
    let qr = encode(text)?;
    let n = side(&qr);
    let width = n * scale;
    let row_len = width.div_ceil(8) as usize;

    // Scanlines: filter type 0 (none), then 8 pixels a byte, most significant bit first;
    // 1 is white, 0 black. Every module row is repeated `scale` times.
    let mut raw = Vec::with_capacity((row_len + 1) * width as usize);
    let mut row = vec![0u8; row_len];
    for my in 0..n {
        row.fill(0);
        for x in 0..width {
            if !dark(&qr, x / scale, my) {
                row[(x / 8) as usize] |= 0x80 >> (x % 8);
            }
        }
        for _ in 0..scale {
            raw.push(0);
            raw.extend_from_slice(&row);
        }
    }
    let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
    z.write_all(&raw).map_err(QrError::Png)?;
    let idat = z.finish().map_err(QrError::Png)?;

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&width.to_be_bytes());
    // Bit depth 1, colour type 0 (grayscale), compression 0, filter method 0, no interlace.
    ihdr.extend_from_slice(&[1, 0, 0, 0, 0]);

    let mut out = Vec::with_capacity(idat.len() + 64);
    out.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    chunk(&mut out, b"IHDR", &ihdr)?;
    chunk(&mut out, b"IDAT", &idat)?;
    chunk(&mut out, b"IEND", &[])?;
    Ok(out)
}

/// Appends one PNG chunk: length, type, data, CRC-32 of type and data.
fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) -> Result<(), QrError> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&len| len < 1 << 31)
        .ok_or_else(|| QrError::Png(std::io::Error::other("PNG chunk too large")))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::io::Read as _;

    /// A ~400-character link behind a viewer URL, built like a real one.
    fn long_link() -> String {
        use base64::Engine as _;
        let payload = concat!(
            r#"{"url":"https://phivault.example.org/shl/manifests/"#,
            r#"I91rhba3VsuGXGchcnr6VHlQFKxfE28kuZ0ssbEuxno/manifest.json","#,
            r#""flag":"LP","key":"rxTgYlOaKJPFtcEd0qcceN8wEU4p94SqAwIWQe6uX7Q","#,
            r#""exp":1767225600,"label":"Summary for Dr. Martinez, cardiology referral, August visit (2 files)"}"#,
        );
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
        let link = format!("https://viewer.example/#shlink:/{b64}");
        assert!((390..=410).contains(&link.len()), "{}", link.len());
        link
    }

    /// Dark modules of the code of `text` in image coordinates (quiet zone included).
    fn expected(text: &str) -> (u32, BTreeSet<(u32, u32)>) {
        let qr = QrCode::encode_text(text, QrCodeEcc::Medium).unwrap();
        assert!(qr.error_correction_level() >= QrCodeEcc::Medium);
        let size = qr.size().unsigned_abs();
        let mut set = BTreeSet::new();
        for y in 0..size {
            for x in 0..size {
                if qr.get_module(x.cast_signed(), y.cast_signed()) {
                    set.insert((x + QUIET_ZONE, y + QUIET_ZONE));
                }
            }
        }
        (size + 2 * QUIET_ZONE, set)
    }

    /// A decoded PNG: width, height and one `true` per black pixel.
    struct Image {
        width: u32,
        height: u32,
        black: Vec<Vec<bool>>,
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    /// Minimal PNG reader for what `png_scaled` writes: grayscale, 1 or 8 bits, no interlace,
    /// filter type 0 only; checks the signature, every chunk CRC and the chunk order.
    fn read_png(png: &[u8]) -> Image {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "signature");
        let mut rest = &png[8..];
        let mut kinds = Vec::new();
        let mut ihdr = Vec::new();
        let mut idat = Vec::new();
        while !rest.is_empty() {
            let len = be32(rest) as usize;
            let kind = &rest[4..8];
            let data = &rest[8..8 + len];
            let crc = be32(&rest[8 + len..]);
            let mut c = Crc::new();
            c.update(kind);
            c.update(data);
            assert_eq!(c.sum(), crc, "CRC of {}", String::from_utf8_lossy(kind));
            match kind {
                b"IHDR" => ihdr = data.to_vec(),
                b"IDAT" => idat.extend_from_slice(data),
                b"IEND" => assert!(data.is_empty()),
                other => panic!("unexpected chunk {}", String::from_utf8_lossy(other)),
            }
            kinds.push(kind.to_vec());
            rest = &rest[12 + len..];
        }
        assert_eq!(kinds.first().map(Vec::as_slice), Some(&b"IHDR"[..]));
        assert_eq!(kinds.last().map(Vec::as_slice), Some(&b"IEND"[..]));
        assert_eq!(ihdr.len(), 13);
        let (width, height) = (be32(&ihdr[0..]), be32(&ihdr[4..]));
        let depth = ihdr[8];
        assert_eq!(
            &ihdr[9..],
            &[0, 0, 0, 0],
            "grayscale, deflate, filter 0, no interlace"
        );
        assert!(depth == 1 || depth == 8);

        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut raw)
            .unwrap();
        let row_len = (width * u32::from(depth)).div_ceil(8) as usize;
        assert_eq!(raw.len(), (row_len + 1) * height as usize, "scanline bytes");
        let black = raw
            .chunks(row_len + 1)
            .map(|line| {
                assert_eq!(line[0], 0, "filter type");
                let bytes = &line[1..];
                (0..width as usize)
                    .map(|x| match depth {
                        1 => bytes[x / 8] & (0x80 >> (x % 8)) == 0,
                        _ => match bytes[x] {
                            0 => true,
                            255 => false,
                            v => panic!("gray level {v}"),
                        },
                    })
                    .collect()
            })
            .collect();
        Image {
            width,
            height,
            black,
        }
    }

    fn check_png(text: &str, scale: u32, png: &[u8]) {
        let (n, dark) = expected(text);
        let img = read_png(png);
        assert_eq!((img.width, img.height), (n * scale, n * scale));
        for (y, row) in img.black.iter().enumerate() {
            for (x, &black) in row.iter().enumerate() {
                let m = (x as u32 / scale, y as u32 / scale);
                assert_eq!(black, dark.contains(&m), "pixel ({x}, {y}), module {m:?}");
            }
        }
        // The quiet zone is really there: the first and last 4 module rows are all white.
        let q = (QUIET_ZONE * scale) as usize;
        assert!(img.black[..q].iter().flatten().all(|b| !b));
        assert!(
            img.black[img.black.len() - q..]
                .iter()
                .flatten()
                .all(|b| !b)
        );
    }

    #[test]
    fn png_pixels_match_modules() {
        let link = long_link();
        for (text, scale) in [
            ("shlink:/eyJ1cmwiOiJodHRwczovL2EuZXhhbXBsZS9tIn0", 1),
            ("shlink:/eyJ1cmwiOiJodHRwczovL2EuZXhhbXBsZS9tIn0", 3),
            (link.as_str(), 5),
            ("", 2),
        ] {
            check_png(text, scale, &png_scaled(text, scale).unwrap());
        }
        check_png(&link, DEFAULT_SCALE, &png(&link).unwrap());
    }

    #[test]
    fn png_is_deterministic_and_rejects_bad_scales() {
        assert_eq!(png("shlink:/x").unwrap(), png("shlink:/x").unwrap());
        assert!(png_scaled("shlink:/x", MAX_SCALE).is_ok());
        for scale in [0, MAX_SCALE + 1, u32::MAX] {
            let err = png_scaled("shlink:/x", scale).unwrap_err();
            assert!(
                matches!(err, QrError::Scale { scale: s } if s == scale),
                "{err}"
            );
        }
    }

    /// Parses the `d` of our own path format back into the set of covered modules.
    fn path_modules(d: &str) -> BTreeSet<(u32, u32)> {
        let mut set = BTreeSet::new();
        assert!(d.is_empty() || d.starts_with('M'));
        for sub in d.split('M').skip(1) {
            let body = sub.strip_suffix('z').expect("closed sub-path");
            let (xy, rest) = body.split_once('h').expect("h");
            let (x, y) = xy.split_once(',').expect("x,y");
            let (run, back) = rest.split_once("v1h-").expect("v1h-");
            assert_eq!(run, back, "run goes back to its start");
            let (x, y, run): (u32, u32, u32) =
                (x.parse().unwrap(), y.parse().unwrap(), run.parse().unwrap());
            assert!(run > 0);
            for dx in 0..run {
                assert!(
                    set.insert((x + dx, y)),
                    "module ({}, {y}) drawn twice",
                    x + dx
                );
            }
        }
        set
    }

    /// The value of attribute `name` in the first element that has it.
    fn attr<'a>(svg: &'a str, name: &str) -> &'a str {
        let start = svg.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
        let end = start + svg[start..].find('"').unwrap();
        &svg[start..end]
    }

    #[test]
    fn svg_path_covers_exactly_the_dark_modules() {
        let link = long_link();
        for text in ["shlink:/eyJ1cmwiOiJodHRwczovL2EuZXhhbXBsZS9tIn0", &link, ""] {
            let svg = svg(text).unwrap();
            let (n, dark) = expected(text);
            assert!(svg.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg "));
            assert!(svg.trim_end().ends_with("</svg>"));
            assert_eq!(attr(&svg, "viewBox"), format!("0 0 {n} {n}"));
            assert_eq!(attr(&svg, "width"), (n * DEFAULT_SCALE).to_string());
            assert_eq!(attr(&svg, "height"), (n * DEFAULT_SCALE).to_string());
            assert_eq!(attr(&svg, "shape-rendering"), "crispEdges");
            assert!(svg.contains(&format!(
                "<rect x=\"0\" y=\"0\" width=\"{n}\" height=\"{n}\" fill=\"#ffffff\"/>"
            )));
            assert_eq!(svg.matches("<path").count(), 1);
            assert_eq!(
                svg.matches('<').count(),
                5,
                "xml decl, svg, rect, path, /svg"
            );
            let d = &svg[svg.find(" d=\"").unwrap()..];
            assert_eq!(path_modules(attr(d, "d")), dark);
            // Nothing a strict CSP would block, and the secret link is not in the markup.
            for banned in [
                "script",
                "href",
                "url(",
                "style",
                "<image",
                "foreignObject",
                " on",
            ] {
                assert!(!svg.contains(banned), "{banned}");
            }
            if !text.is_empty() {
                assert!(!svg.contains(text));
            }
        }
    }

    #[test]
    fn a_400_character_shlink_encodes_at_level_m() {
        let link = long_link();
        let qr = encode(&link).unwrap();
        assert!(qr.error_correction_level() >= QrCodeEcc::Medium);
        // 394 bytes: more than version 14-M holds (361), within version 15-M (409).
        assert_eq!(link.len(), 394);
        assert_eq!(qr.version().value(), 15);
        assert!(svg(&link).is_ok());
        assert!(png(&link).is_ok());
    }

    #[test]
    fn too_long_for_version_40_is_an_error() {
        // Byte mode at level M holds 2 331 bytes in version 40 (level L would hold 2 953).
        let fits = "a".repeat(2331);
        assert_eq!(encode(&fits).unwrap().version().value(), 40);
        let long = "a".repeat(2332);
        for err in [
            encode(&long).err().unwrap(),
            svg(&long).unwrap_err(),
            png(&long).unwrap_err(),
        ] {
            assert!(matches!(err, QrError::TooLong { bytes: 2332 }), "{err}");
            assert!(
                !format!("{err} {err:?}").contains("aaaa"),
                "error leaks the text"
            );
        }
        let huge = "shlink:/".repeat(1000);
        assert!(matches!(
            png_scaled(&huge, 2),
            Err(QrError::TooLong { bytes: 8000 })
        ));
    }
}
