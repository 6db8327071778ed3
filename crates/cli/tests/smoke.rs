mod common;
use common::*;

#[test]
fn smoke_create_read() {
    let s = Server::start();
    let t = s.token("system/*.cruds");
    let r = s.post("Patient", &t, &patient());
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let g = s.get(&format!("Patient/{id}"), &t);
    assert_eq!(g.status, 200);
    assert_eq!(g.json()["name"], patient()["name"]);
    let (ok, msg) = s.audit_verify();
    assert!(ok, "{msg}");
}
