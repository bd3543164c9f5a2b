//! Images named by requests: `data:` URIs (decoded into a per-request
//! temporary folder, since the pipelines read images from files) and,
//! only under `--allow-local-files DIR`, local paths inside DIR.
//! `http(s)` URLs are refused: the server has no network.

use crate::error::ApiError;
use base64::Engine as _;
use std::path::{Path, PathBuf};

/// Where a request's images may come from, and how big they may be.
#[derive(Debug, Clone)]
pub struct ImagePolicy {
    /// The canonical `--allow-local-files` folder.
    pub local_root: Option<PathBuf>,
    /// Most pixels (width × height) of one input image.
    pub max_pixels: u64,
}

/// The files of one request; removed when the request is done.
pub struct RequestFiles {
    dir: Option<tempfile::TempDir>,
    count: usize,
}

impl RequestFiles {
    pub fn new() -> Self {
        Self { dir: None, count: 0 }
    }

    fn write(&mut self, bytes: &[u8], ext: &str) -> std::io::Result<PathBuf> {
        if self.dir.is_none() {
            self.dir = Some(tempfile::Builder::new().prefix("emu-serve-").tempdir()?);
        }
        let dir = self.dir.as_ref().map(|d| d.path().to_path_buf()).unwrap_or_default();
        self.count += 1;
        let path = dir.join(format!("image{}.{ext}", self.count));
        std::fs::write(&path, bytes)?;
        Ok(path)
    }
}

impl Default for RequestFiles {
    fn default() -> Self {
        Self::new()
    }
}

impl ImagePolicy {
    /// Turns the image reference `url` (field `param` of the request) into a
    /// path the pipelines can read, checking format and size.
    pub fn resolve(&self, url: &str, param: &str, files: &mut RequestFiles) -> Result<String, ApiError> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Err(ApiError::param(
                param,
                "image URLs are not supported: this server does not fetch from the network; send the image as a data URI (data:image/png;base64,...)",
            )
            .with_code("unsupported_url"));
        }
        if let Some(rest) = strip_prefix_ci(url, "data:") {
            let bytes = decode_data_uri(rest).map_err(|m| ApiError::param(param, m).with_code("invalid_image"))?;
            let ext = self.check_image(&bytes, param)?;
            let path = files
                .write(&bytes, ext)
                .map_err(|e| ApiError::internal(format!("cannot store the image: {e}")))?;
            return path
                .to_str()
                .map(str::to_string)
                .ok_or_else(|| ApiError::internal("temporary folder path is not UTF-8"));
        }
        let path = match strip_prefix_ci(url, "file://") {
            Some(p) => p,
            None if url.contains("://") => {
                return Err(ApiError::param(
                    param,
                    "unsupported image URL scheme; use a data URI (or a local path under --allow-local-files)",
                )
                .with_code("unsupported_url"))
            }
            None => url,
        };
        let path = self.local_path(path, param)?;
        let bytes = std::fs::read(&path)
            .map_err(|e| ApiError::param(param, format!("cannot read `{}`: {e}", path.display())))?;
        self.check_image(&bytes, param)?;
        path.to_str()
            .map(str::to_string)
            .ok_or_else(|| ApiError::param(param, "the path is not valid UTF-8"))
    }

    /// `path` resolved (symlinks and `..` included) and checked to lie inside
    /// the allowed folder.
    fn local_path(&self, path: &str, param: &str) -> Result<PathBuf, ApiError> {
        let Some(root) = &self.local_root else {
            return Err(ApiError::forbidden(
                "local file paths are disabled; send images as data URIs, or start the server with --allow-local-files DIR",
            )
            .with_param(param)
            .with_code("local_files_disabled"));
        };
        let given = Path::new(path);
        let joined = if given.is_absolute() {
            given.to_path_buf()
        } else {
            root.join(given)
        };
        let outside = || {
            ApiError::forbidden(format!(
                "`{path}` is not inside the folder allowed by --allow-local-files"
            ))
            .with_param(param)
            .with_code("path_not_allowed")
        };
        // Canonicalising follows every symlink, so a link inside the folder
        // that points out of it is refused too; a missing file is reported
        // as outside rather than revealing what exists elsewhere.
        let canonical = joined.canonicalize().map_err(|_| {
            let climbs = joined.components().any(|c| c == std::path::Component::ParentDir);
            if joined.starts_with(root) && !climbs {
                ApiError::param(param, format!("`{path}` does not exist")).with_code("file_not_found")
            } else {
                outside()
            }
        })?;
        if !canonical.starts_with(root) || !canonical.is_file() {
            return Err(outside());
        }
        Ok(canonical)
    }

    /// Checks that `bytes` are a PNG or JPEG of at most `max_pixels`; returns the extension.
    fn check_image(&self, bytes: &[u8], param: &str) -> Result<&'static str, ApiError> {
        let bad = |m: String| ApiError::param(param, m).with_code("invalid_image");
        let format = image::guess_format(bytes).map_err(|_| bad("the image is neither PNG nor JPEG".into()))?;
        let ext = match format {
            image::ImageFormat::Png => "png",
            image::ImageFormat::Jpeg => "jpg",
            other => return Err(bad(format!("{other:?} images are not supported; send PNG or JPEG"))),
        };
        let reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| bad(format!("the image cannot be read: {e}")))?;
        if u64::from(w) * u64::from(h) > self.max_pixels {
            return Err(ApiError::param(
                param,
                format!(
                    "the image is {w}x{h} pixels, more than this server's limit of {} pixels",
                    self.max_pixels
                ),
            )
            .with_code("image_too_large"));
        }
        Ok(ext)
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// The bytes of a `data:` URI body (`image/png;base64,....`).
fn decode_data_uri(rest: &str) -> Result<Vec<u8>, String> {
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| "a data URI needs a comma between its media type and its data".to_string())?;
    let mut parts = meta.split(';');
    let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if !mime.is_empty() && !mime.starts_with("image/") {
        return Err(format!("the data URI holds `{mime}`, not an image"));
    }
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err("only base64 data URIs are supported (data:image/png;base64,...)".into());
    }
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("the data URI is not valid base64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::new(w, h);
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn uri(bytes: &[u8]) -> String {
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn data_uris() {
        let policy = ImagePolicy {
            local_root: None,
            max_pixels: 100,
        };
        let mut files = RequestFiles::new();
        let p = policy.resolve(&uri(&png(10, 10)), "x", &mut files).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), png(10, 10));
        let too_big = policy.resolve(&uri(&png(11, 10)), "x", &mut files).unwrap_err();
        assert_eq!(too_big.code, Some("image_too_large"));
        let bad = policy
            .resolve("data:image/png;base64,@@@", "x", &mut files)
            .unwrap_err();
        assert_eq!((bad.code, bad.param.as_deref()), (Some("invalid_image"), Some("x")));
        let not_image = policy.resolve(&uri(b"hello"), "x", &mut files).unwrap_err();
        assert_eq!(not_image.code, Some("invalid_image"));
        for url in ["https://example.com/a.png", "HTTP://x/y", "ftp://x/y"] {
            assert_eq!(
                policy.resolve(url, "x", &mut files).unwrap_err().code,
                Some("unsupported_url")
            );
        }
        let local = policy.resolve("/etc/passwd", "x", &mut files).unwrap_err();
        assert_eq!(local.code, Some("local_files_disabled"));
    }

    #[test]
    fn local_files_stay_inside_the_folder() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("in.png"), png(4, 4)).unwrap();
        std::fs::write(outside.path().join("out.png"), png(4, 4)).unwrap();
        let policy = ImagePolicy {
            local_root: Some(root.path().canonicalize().unwrap()),
            max_pixels: 100,
        };
        let mut files = RequestFiles::new();
        assert!(policy.resolve("in.png", "x", &mut files).is_ok());
        let abs = root.path().join("in.png");
        assert!(policy
            .resolve(&format!("file://{}", abs.display()), "x", &mut files)
            .is_ok());
        let escape = outside.path().join("out.png");
        let cases = [
            escape.display().to_string(),
            "../out.png".into(),
            format!("in.png/../../{}", "x"),
        ];
        for c in &cases {
            assert_eq!(policy.resolve(c, "x", &mut files).unwrap_err().status, 403, "{c}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&escape, root.path().join("link.png")).unwrap();
            let e = policy.resolve("link.png", "x", &mut files).unwrap_err();
            assert_eq!(e.code, Some("path_not_allowed"));
        }
        let missing = policy.resolve("nope.png", "x", &mut files).unwrap_err();
        assert_eq!(missing.code, Some("file_not_found"));
    }
}
