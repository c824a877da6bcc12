// The pairing page's poller (services/web/console_pair.py): fetch the attempt's fragment
// every second and swap it in when X-Pairing-Seq changed (a new QR, the code, the end);
// stop once X-Pairing-Done is 1. Same origin, no inline script (the CSP allows 'self').
(function () {
  "use strict";
  var box = document.getElementById("pairing");
  if (!box) {
    return;
  }
  var src = box.getAttribute("data-src");
  var seq = box.getAttribute("data-seq");

  function fail(line) {
    var p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = line;
    box.replaceChildren(p);
  }

  function poll() {
    fetch(src, { credentials: "same-origin", cache: "no-store" })
      .then(function (answer) {
        return answer.text().then(function (text) {
          if (!answer.ok) {
            if (answer.status >= 500) {
              setTimeout(poll, 3000); // a worker or NATS hiccup: try again
              return;
            }
            fail(text.split("\n")[0] || "HTTP " + answer.status);
            return;
          }
          var now = answer.headers.get("X-Pairing-Seq");
          if (now !== seq) {
            box.innerHTML = text; // server-rendered and escaped (console_pair.fragment)
            seq = now;
            box.setAttribute("data-seq", now);
          }
          if (answer.headers.get("X-Pairing-Done") === "1") {
            box.setAttribute("data-done", "1");
          } else {
            setTimeout(poll, 1000);
          }
        });
      })
      .catch(function () {
        setTimeout(poll, 3000);
      });
  }

  if (box.getAttribute("data-done") !== "1") {
    setTimeout(poll, 1000);
  }
})();
