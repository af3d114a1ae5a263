#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Every shipped language: hello world, stdin echo, a compile error, a runtime error.
//! Python, Bash, C, C++, Java, JavaScript and Rust must be installed (scripts/services
//! installs them); Go, C# and R are tried when they are.

use std::sync::atomic::AtomicBool;

use sandbox::{Limits, Request, Sandbox, Settings, Status};

/// The shipped settings with the launcher under test: `LABRELAY_TEST_SANDBOX_LAUNCHER`
/// (scripts/test runs this suite once with each), else the default.
fn settings() -> Settings {
    let mut s = Settings::shipped();
    if let Ok(l) = std::env::var("LABRELAY_TEST_SANDBOX_LAUNCHER") {
        s.sandbox.launcher = l;
    }
    s
}

/// (language, hello world, stdin echo, compile error, runtime error)
const PROGRAMS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "python",
        "print('hello, world')\n",
        "import sys\nprint(sys.stdin.read().strip().upper())\n",
        "def f(:\n",
        "raise SystemExit(3)\n",
    ),
    (
        "bash",
        "echo 'hello, world'\n",
        "read -r x; echo \"${x^^}\"\n",
        "if then fi (\n",
        "exit 3\n",
    ),
    (
        "c",
        "#include <stdio.h>\nint main(void){puts(\"hello, world\");return 0;}\n",
        "#include <stdio.h>\n#include <ctype.h>\nint main(void){int c;while((c=getchar())!=EOF){if(c!='\\n')putchar(toupper(c));}putchar('\\n');return 0;}\n",
        "int main(void){ return undefined_name; }\n",
        "int main(void){ return 3; }\n",
    ),
    (
        "cpp",
        "#include <iostream>\nint main(){std::cout<<\"hello, world\\n\";}\n",
        "#include <iostream>\n#include <string>\n#include <cctype>\nint main(){std::string s;std::getline(std::cin,s);for(auto&c:s)c=std::toupper(c);std::cout<<s<<\"\\n\";}\n",
        "int main(){ std::cout << 1; }\n",
        "int main(){ return 3; }\n",
    ),
    (
        "java",
        "public class Main { public static void main(String[] a) { System.out.println(\"hello, world\"); } }\n",
        "public class Main { public static void main(String[] a) { System.out.println(new java.util.Scanner(System.in).nextLine().toUpperCase()); } }\n",
        "public class Main { public static void main(String[] a) { int x = \"s\"; } }\n",
        "public class Main { public static void main(String[] a) { System.exit(3); } }\n",
    ),
    (
        "javascript",
        "console.log('hello, world');\n",
        "console.log(require('fs').readFileSync(0, 'utf8').trim().toUpperCase());\n",
        "function (\n",
        "process.exit(3);\n",
    ),
    (
        "rust",
        "fn main() { println!(\"hello, world\"); }\n",
        "use std::io::Read;\nfn main() { let mut s = String::new(); std::io::stdin().read_to_string(&mut s).unwrap(); println!(\"{}\", s.trim().to_uppercase()); }\n",
        "fn main() { let x: u32 = \"s\"; }\n",
        "fn main() { std::process::exit(3); }\n",
    ),
    (
        "go",
        "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hello, world\") }\n",
        "package main\nimport (\"bufio\";\"fmt\";\"os\";\"strings\")\nfunc main() { s, _ := bufio.NewReader(os.Stdin).ReadString('\\n'); fmt.Println(strings.ToUpper(strings.TrimSpace(s))) }\n",
        "package main\nfunc main() { x := }\n",
        "package main\nimport \"os\"\nfunc main() { os.Exit(3) }\n",
    ),
    (
        "csharp",
        "class P { static void Main() { System.Console.WriteLine(\"hello, world\"); } }\n",
        "class P { static void Main() { System.Console.WriteLine(System.Console.ReadLine().ToUpper()); } }\n",
        "class P { static void Main() { int x = \"s\"; } }\n",
        "class P { static void Main() { System.Environment.Exit(3); } }\n",
    ),
    (
        "r",
        "cat('hello, world\\n')\n",
        "cat(toupper(readLines(file('stdin'), n = 1)), '\\n', sep = '')\n",
        "f <- function( {\n",
        "quit(status = 3)\n",
    ),
];

const REQUIRED: &[&str] = &["python", "bash", "c", "cpp", "java", "javascript", "rust"];

fn run(sb: &Sandbox, lang: &str, src: &str, stdin: Option<&str>) -> sandbox::Report {
    let l = sb.settings().language(lang).unwrap();
    let limits = Limits {
        // Java and the compilers on a loaded 2-core machine.
        time_secs: 10.0,
        wall_secs: 30.0,
        ..l.limits
    };
    sb.run(
        &Request {
            language: l,
            source: src.as_bytes(),
            stdin: stdin.map(str::as_bytes),
            expected: None,
            limits,
        },
        &AtomicBool::new(false),
    )
}

#[test]
fn every_installed_language_runs_compiles_and_fails_as_it_should() {
    let sb = Sandbox::new(settings()).expect("a sandbox on this host");
    let path = sb.settings().sandbox.path.clone();
    let mut tried = Vec::new();
    for (lang, hello, echo, bad, crash) in PROGRAMS {
        let l = sb.settings().language(lang).unwrap();
        if l.installed(&path).is_none() {
            assert!(
                !REQUIRED.contains(lang),
                "{lang} is not installed: scripts/services installs it"
            );
            eprintln!("{lang}: not installed here, skipped");
            continue;
        }
        tried.push(*lang);
        let r = run(&sb, lang, hello, None);
        assert_eq!(r.status, Status::Accepted, "{lang} hello: {r:?}");
        assert_eq!(r.stdout, "hello, world\n", "{lang} hello");
        assert_eq!(r.exit_code, Some(0));
        assert!(r.wall_ms > 0 && r.memory_kib > 0, "{lang}: {r:?}");

        let r = run(&sb, lang, echo, Some("labrelay echo\n"));
        assert_eq!(r.status, Status::Accepted, "{lang} echo: {r:?}");
        assert_eq!(r.stdout.trim_end(), "LABRELAY ECHO", "{lang} echo");

        let r = run(&sb, lang, bad, None);
        if l.compile.is_some() {
            assert_eq!(r.status, Status::CompilationError, "{lang} bad: {r:?}");
            assert!(
                !r.compile_output.is_empty(),
                "{lang}: the compiler said nothing"
            );
        } else {
            // An interpreter finds the syntax error when it runs.
            assert_eq!(r.status, Status::RuntimeError, "{lang} bad: {r:?}");
        }

        let r = run(&sb, lang, crash, None);
        assert_eq!(r.status, Status::RuntimeError, "{lang} crash: {r:?}");
        assert_eq!(r.exit_code, Some(3), "{lang} crash: {r:?}");
    }
    for l in REQUIRED {
        assert!(tried.contains(l), "{l}");
    }
}

#[test]
fn expected_output_decides_between_accepted_and_wrong_answer() {
    let sb = Sandbox::new(settings()).unwrap();
    let l = sb.settings().language("python").unwrap();
    let go = |expected: &str| {
        sb.run(
            &Request {
                language: l,
                source: b"print('42')\nprint('x  ')\n",
                stdin: None,
                expected: Some(expected.as_bytes()),
                limits: l.limits,
            },
            &AtomicBool::new(false),
        )
    };
    // Trailing blanks and a missing last newline do not matter.
    assert_eq!(go("42\nx").status, Status::Accepted);
    assert_eq!(go("42\nx\n\n").status, Status::Accepted);
    let r = go("43\nx\n");
    assert_eq!(r.status, Status::WrongAnswer);
    assert_eq!(r.exit_code, Some(0));
}

#[test]
fn a_missing_bwrap_fails_closed() {
    let mut s = Settings::shipped();
    s.sandbox.launcher = "bwrap".into();
    s.sandbox.bwrap = "/nonexistent/bwrap".into();
    let e = Sandbox::new(s).unwrap_err();
    assert!(e.contains("bubblewrap"), "{e}");
}

#[test]
fn an_unknown_launcher_is_refused() {
    let mut s = Settings::shipped();
    s.sandbox.launcher = "chroot".into();
    let e = Sandbox::new(s).unwrap_err();
    assert!(e.contains("[sandbox] launcher = \"chroot\""), "{e}");
}

#[test]
fn exit_codes_and_signals_are_reported_as_they_were() {
    let sb = Sandbox::new(settings()).unwrap();
    let go = |src: &str| run(&sb, "python", src, None);
    let r = go("import os, signal\nos.kill(os.getpid(), signal.SIGABRT)\n");
    assert_eq!(
        (r.status, r.exit_code, r.signal),
        (Status::RuntimeError, None, Some(6)),
        "{r:?}"
    );
    let r = go("import sys\nsys.exit(3)\n");
    assert_eq!((r.exit_code, r.signal), (Some(3), None), "{r:?}");
    // An exit code above 128: the direct launcher has the program's own wait status;
    // bubblewrap's exit code cannot tell it from a signal (docs/code-submit.md).
    let r = go("import sys\nsys.exit(130)\n");
    if sb.settings().sandbox.launcher == "bwrap" {
        assert_eq!((r.exit_code, r.signal), (None, Some(2)), "{r:?}");
    } else {
        assert_eq!((r.exit_code, r.signal), (Some(130), None), "{r:?}");
    }
}

#[test]
fn without_cgroups_rlimits_hold_and_the_report_says_weaker() {
    let mut s = settings();
    s.sandbox.cgroup = "none".into();
    let sb = Sandbox::new(s).unwrap();
    assert_eq!(sb.limits_label(), "rlimits");
    let l = sb.settings().language("python").unwrap();
    // RLIMIT_NPROC counts every process of the box user on the host (other boxes too):
    // that is what makes this mode weaker; a high limit keeps this test independent.
    let limits = Limits {
        processes: 100_000,
        time_secs: 1.0,
        ..l.limits
    };
    let go = |src: &str| {
        sb.run(
            &Request {
                language: l,
                source: src.as_bytes(),
                stdin: None,
                expected: None,
                limits,
            },
            &AtomicBool::new(false),
        )
    };
    let r = go("print('hi')\n");
    assert_eq!(
        (r.status, r.stdout.as_str()),
        (Status::Accepted, "hi\n"),
        "{r:?}"
    );
    assert_eq!(r.limits, "rlimits");
    // RLIMIT_CPU: the kernel's SIGXCPU, or the host's own check of the rusage.
    let r = go("while True: pass\n");
    assert_eq!(r.status, Status::TimeLimitExceeded, "{r:?}");
    // RLIMIT_AS: an allocation fails inside the program.
    let r = go("a = bytearray(1 << 30)\n");
    assert_eq!(r.status, Status::RuntimeError, "{r:?}");
    assert!(r.stderr.contains("MemoryError"), "{r:?}");
}

#[test]
fn binds_twice_or_below_usr_still_build_a_box() {
    let mut s = settings();
    s.sandbox.binds.push("/etc/ld.so.cache".into());
    s.sandbox.binds.push("/usr/share".into());
    let sb = Sandbox::new(s).unwrap();
    let mut lang = sb.settings().language("python").unwrap().clone();
    lang.binds = vec!["/etc/alternatives".into(), "/usr/lib".into()];
    let r = sb.run(
        &Request {
            language: &lang,
            source: b"import os\nprint(os.path.exists('/etc/ld.so.cache'), os.path.isdir('/usr/share'))\n",
            stdin: None,
            expected: None,
            limits: lang.limits,
        },
        &AtomicBool::new(false),
    );
    assert_eq!(
        (r.status, r.stdout.as_str()),
        (Status::Accepted, "True True\n"),
        "{r:?}"
    );
}
