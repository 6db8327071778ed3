//! A redacting, zeroizing wrapper for secrets and PHI.

use std::fmt;

use zeroize::Zeroize;

/// Holds a secret (key material, a private key in PKCS#8, a token, PHI).
///
/// * `Debug` and `Display` print `[redacted]`, so a secret that ends up in a log line
///   or an error message shows nothing.
/// * The value is zeroized when the wrapper is dropped.
/// * The only way to the value is [`Secret::expose`], which makes every use greppable.
///
/// Copies the caller makes from `expose()` are the caller's responsibility.
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// Borrows the secret value.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// Crate-internal mutable access (kept out of the public API so that a `Secret` handed
    /// out cannot be altered in place).
    pub(crate) fn expose_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize + Clone> Clone for Secret<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Zeroize> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T: Zeroize> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let s = Secret::new(String::from("123-45-6789"));
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
        assert_eq!(s.expose(), "123-45-6789");
    }

    #[test]
    fn clone_keeps_value() {
        let s = Secret::new(vec![1u8, 2, 3]);
        let c = s.clone();
        drop(s);
        assert_eq!(c.expose(), &[1, 2, 3]);
    }
}
