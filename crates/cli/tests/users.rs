//! People's accounts through the real binary (`phivault user …`): named accounts linked to
//! a Practitioner or Patient that exists, the password policy, the enrolment secret shown
//! once and stored only sealed, disable and role changes.
mod common;
use common::*;

const PASSWORD: &str = "quartz-meadow-lantern-7";

/// `phivault user ARGS` with `stdin` on its standard input.
fn user(server: &Server, args: &[&str], stdin: &str) -> std::process::Output {
    let data = server.data.to_str().expect("path");
    let mut all = vec!["user", args[0], "--data-dir", data];
    all.extend_from_slice(&args[1..]);
    common::flow::cli(&all, stdin)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn accounts_are_named_linked_sealed_and_shown_once() {
    let server = Server::start();
    let token = server.token("system/*.cruds");
    let loaded = server.load_synth(&token, 1, 41);
    let map = &loaded[0].1;
    let id_of = |rtype: &str| -> String {
        map.values()
            .find_map(|t| t.strip_prefix(&format!("{rtype}/")))
            .unwrap_or_else(|| panic!("a {rtype} in the bundle"))
            .to_owned()
    };
    let (prac, pat) = (id_of("Practitioner"), id_of("Patient"));

    // a clinician linked to an existing Practitioner
    let o = user(
        &server,
        &[
            "add",
            "--username",
            "Greta.Lindqvist",
            "--role",
            "clinician",
            "--practitioner",
            &prac,
        ],
        &format!("{PASSWORD}\n"),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let uri = text(&o.stdout);
    let uri = uri.trim();
    assert!(
        uri.starts_with("otpauth://totp/phivault:greta.lindqvist?secret="),
        "{uri}"
    );
    let secret = uri
        .split("secret=")
        .nth(1)
        .and_then(|s| s.split('&').next())
        .expect("secret");
    assert_eq!(secret.len(), 32, "160-bit secret in base32");
    let err = text(&o.stderr);
    assert!(err.contains("shown once") && !err.contains(secret) && !err.contains(PASSWORD));

    // a patient user linked to an existing Patient
    let o = user(
        &server,
        &[
            "add",
            "--username",
            "pat.one",
            "--role",
            "patient",
            "--patient",
            &pat,
        ],
        &format!("{PASSWORD}\n"),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    // an auditor
    let o = user(
        &server,
        &["add", "--username", "audrey.k", "--role", "auditor"],
        &format!("{PASSWORD}\r\n"),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));

    // refusals: taken name, generic name, missing or unknown link, wrong link kind, weak
    // or username-based password, unknown role
    for (args, pw, why) in [
        (
            vec!["add", "--username", "greta.lindqvist", "--role", "auditor"],
            PASSWORD,
            "exists",
        ),
        (
            vec!["add", "--username", "admin", "--role", "admin"],
            PASSWORD,
            "shared account",
        ),
        (
            vec!["add", "--username", "shared", "--role", "auditor"],
            PASSWORD,
            "shared account",
        ),
        (
            vec!["add", "--username", "carl.b", "--role", "clinician"],
            PASSWORD,
            "--practitioner",
        ),
        (
            vec![
                "add",
                "--username",
                "carl.b",
                "--role",
                "clinician",
                "--practitioner",
                "nope",
            ],
            PASSWORD,
            "no Practitioner",
        ),
        (
            vec![
                "add",
                "--username",
                "carl.b",
                "--role",
                "patient",
                "--patient",
                &prac,
            ],
            PASSWORD,
            "no Patient",
        ),
        (
            vec!["add", "--username", "carl.b", "--role", "auditor"],
            "short",
            "too short",
        ),
        (
            vec!["add", "--username", "carl.b", "--role", "auditor"],
            "carl.b-carl.b-x",
            "guess",
        ),
        (
            vec!["add", "--username", "carl.b", "--role", "wizard"],
            PASSWORD,
            "--role",
        ),
    ] {
        let o = user(&server, &args, &format!("{pw}\n"));
        assert!(!o.status.success(), "{args:?} was accepted");
        let err = text(&o.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "no secret printed on refusal");
        assert!(!err.contains(pw) || pw == "short", "{err}");
    }

    // role change and disable; unknown users are refused
    let o = user(
        &server,
        &["role", "--username", "audrey.k", "--role", "admin"],
        "",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = user(
        &server,
        &["role", "--username", "audrey.k", "--role", "patient"],
        "",
    );
    assert!(!o.status.success());
    let o = user(&server, &["disable", "--username", "pat.one"], "");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = user(&server, &["disable", "--username", "nobody.here"], "");
    assert!(!o.status.success() && text(&o.stderr).contains("no such user"));

    // nothing of the accounts is readable in the data directory
    let mut server = server;
    server.stop();
    for f in files_under(&server.data) {
        let bytes = std::fs::read(&f).expect("read");
        for needle in [
            "greta.lindqvist",
            "pat.one",
            "audrey.k",
            secret,
            PASSWORD,
            "$argon2id",
        ] {
            assert!(
                !contains(&bytes, needle.as_bytes()),
                "{needle} in {}",
                f.display()
            );
        }
    }
}
